import{b as a,c as b,d as c}from"./chunk-2A4BNKV5.js";export{a as SAMPLE_RATE,b as decodeToMono16k,c as recordMicrophone};
