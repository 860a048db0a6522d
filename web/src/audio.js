// Audio in, 16 kHz mono float32 out: the waveform fl_ser.data.audio.read_audio gives Python, computed the same way.
//
// A PCM or float WAV file is parsed here, scaled as libsndfile scales it; other formats (and the microphone's
// WebM/Opus) are decoded by the browser at 48 kHz (Opus's own rate). Channels are averaged, then the
// wave is resampled to 16 kHz with the algorithm read_audio uses, torchaudio.functional.resample's defaults
// (windowed sinc, Hann window, 6 zero crossings, roll-off 0.99). read_audio's refusals are mirrored: too short,
// silent, below 16 kHz, or a rate whose exact resampling needs too large a filter bank.

export const SAMPLE_RATE = 16000;
/** Shortest audio the model is given (fl_ser.data.audio.AudioPolicy.min_seconds). */
const MIN_SECONDS = 0.3;
/** Peak level below which audio is refused as silent (AudioPolicy.silence_dbfs). */
const SILENCE_DBFS = -60;
/** Largest p x q of a reduced rate ratio p/q (fl_ser.data.audio.MAX_RESAMPLING_BANK). */
const MAX_RESAMPLING_BANK = 2 ** 22;
/** The rate non-WAV audio is decoded at (Opus's own rate). */
const OTHER_RATE = 48000;
const ZERO_CROSSINGS = 6; // torchaudio's lowpass_filter_width
const ROLLOFF = 0.99;

class AudioInputError extends Error {}

/**
 * A PCM or float WAV file's samples, as libsndfile (read_audio's reader) scales them: integers divided by
 * 2^(bits - 1) (8-bit: offset 128), floats as they are. Returns {rate, channels: [Float32Array]}, or null for
 * anything else (then the browser decodes it). Chromium's own decoder divides positive 16-bit samples by 32767
 * and negative ones by 32768, one LSB off libsndfile.
 */
function parseWav(bytes) {
  const view = new DataView(bytes);
  const tag = (at) => String.fromCharCode(...new Uint8Array(bytes, at, 4));
  if (bytes.byteLength < 12 || tag(0) !== 'RIFF' || tag(8) !== 'WAVE') return null;
  let format = null;
  for (let at = 12; at + 8 <= bytes.byteLength;) {
    const size = view.getUint32(at + 4, true);
    if (tag(at) === 'fmt ' && size >= 16) {
      const code = view.getUint16(at + 8, true);
      const extensible = code === 0xfffe && size >= 40;
      format = { code: extensible ? view.getUint16(at + 32, true) : code, channels: view.getUint16(at + 10, true),
        rate: view.getUint32(at + 12, true), bits: view.getUint16(at + 22, true) };
    } else if (tag(at) === 'data' && format) {
      return samples(view, at + 8, Math.min(size, bytes.byteLength - at - 8), format);
    }
    at += 8 + size + (size & 1);
  }
  return null;
}

function samples(view, offset, size, { code, channels, rate, bits }) {
  const read = {
    '1:8': (at) => (view.getUint8(at) - 128) / 128,
    '1:16': (at) => view.getInt16(at, true) / 32768,
    '1:24': (at) => ((view.getUint8(at + 2) << 24) | (view.getUint8(at + 1) << 16) | (view.getUint8(at) << 8)) / 2 ** 31,
    '1:32': (at) => view.getInt32(at, true) / 2 ** 31,
    '3:32': (at) => view.getFloat32(at, true),
    '3:64': (at) => view.getFloat64(at, true),
  }[`${code}:${bits}`];
  if (!read || channels === 0) return null;
  const step = bits / 8;
  const frames = Math.floor(size / (step * channels));
  const out = Array.from({ length: channels }, () => new Float32Array(frames));
  for (let f = 0; f < frames; f++) {
    for (let c = 0; c < channels; c++) out[c][f] = read(offset + (f * channels + c) * step);
  }
  return { rate, channels: out };
}

/** The audio's rate and channels: parsed when it is a PCM or float WAV, else decoded by the browser at 48 kHz. */
async function decode(bytes) {
  const wav = parseWav(bytes);
  if (wav) return wav;
  try {
    const buffer = await new OfflineAudioContext(1, 1, OTHER_RATE).decodeAudioData(bytes);
    return { rate: OTHER_RATE, channels: Array.from({ length: buffer.numberOfChannels }, (_, c) => buffer.getChannelData(c)) };
  } catch (err) {
    throw new AudioInputError(`this browser cannot decode the file (${err.message}); convert it to WAV, ` +
      'e.g. `ffmpeg -i IN -ar 16000 OUT.wav`');
  }
}

/** Decode encoded audio (WAV, FLAC, OGG, WebM, ...) to mono float32 at 16 kHz. */
export async function decodeToMono16k(bytes) {
  const { rate, channels } = await decode(bytes);
  checkRate(rate);
  const wave = resample(downmix(channels), rate);
  checkLevel(wave);
  return wave;
}

function gcd(a, b) {
  return b === 0 ? a : gcd(b, a % b);
}

function checkRate(rate) {
  if (rate < SAMPLE_RATE) {
    throw new AudioInputError(`the file is recorded at ${rate} Hz, below the 16000 Hz the features need; ` +
      're-record at 16 kHz or more (upsampling cannot restore the missing band)');
  }
  const common = gcd(rate, SAMPLE_RATE);
  if ((rate / common) * (SAMPLE_RATE / common) > MAX_RESAMPLING_BANK) {
    throw new AudioInputError(`${rate} Hz cannot be resampled exactly to 16 kHz with a filter bank of sensible ` +
      'size; resample it to 16 kHz first (e.g. `ffmpeg -i IN -ar 16000 OUT.wav`)');
  }
}

/** The mean of the channels, in float32 (as read_audio: numpy's float32 mean). */
function downmix(channels) {
  if (channels.length === 1) return channels[0];
  const wave = new Float32Array(channels[0].length);
  for (const channel of channels) {
    for (let i = 0; i < wave.length; i++) wave[i] += channel[i];
  }
  for (let i = 0; i < wave.length; i++) wave[i] /= channels.length;
  return wave;
}

/**
 * torchaudio.functional.resample(wave, from, 16000) with its defaults, in float64 (torchaudio: float32).
 * With g = gcd(from, 16000), p = from / g and q = 16000 / g, output sample k q + j is the dot product of
 * phase j's windowed-sinc kernel with the input from k p - width on (zeros outside the wave).
 */
function resample(wave, from) {
  if (from === SAMPLE_RATE) return wave;
  const common = gcd(from, SAMPLE_RATE);
  const p = from / common;
  const q = SAMPLE_RATE / common;
  const base = Math.min(p, q) * ROLLOFF;
  const width = Math.ceil((ZERO_CROSSINGS * p) / base);
  const taps = 2 * width + p;
  const kernel = new Float64Array(q * taps);
  for (let j = 0; j < q; j++) {
    for (let i = 0; i < taps; i++) {
      const t = Math.min(Math.max((-j / q + (i - width) / p) * base, -ZERO_CROSSINGS), ZERO_CROSSINGS);
      const window = Math.cos((t * Math.PI) / ZERO_CROSSINGS / 2) ** 2;
      kernel[j * taps + i] = (t === 0 ? 1 : Math.sin(Math.PI * t) / (Math.PI * t)) * window * (base / p);
    }
  }
  const out = new Float32Array(Math.ceil((q * wave.length) / p));
  for (let n = 0; n < out.length; n++) {
    const j = n % q;
    const start = ((n - j) / q) * p - width;
    const first = Math.max(0, -start);
    const last = Math.min(taps, wave.length - start);
    let sum = 0;
    for (let i = first; i < last; i++) sum += kernel[j * taps + i] * wave[start + i];
    out[n] = sum;
  }
  return out;
}

function checkLevel(wave) {
  const seconds = wave.length / SAMPLE_RATE;
  if (seconds < MIN_SECONDS) {
    throw new AudioInputError(`the audio lasts ${seconds.toFixed(2)} s, under ${MIN_SECONDS} s; use a whole utterance`);
  }
  let peak = 0;
  for (const x of wave) peak = Math.max(peak, Math.abs(x));
  const dbfs = 20 * Math.log10(Math.max(peak, 1e-12));
  if (dbfs < SILENCE_DBFS) {
    throw new AudioInputError(`the audio is silent (peak ${dbfs.toFixed(1)} dBFS); check the microphone and record again`);
  }
}

/** Record `seconds` of the default microphone and decode it like a file. The stream stops afterwards. */
export async function recordMicrophone(seconds) {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (err) {
    throw new AudioInputError(`no microphone (${err.name}: ${err.message}); allow this page to use it, or choose a WAV file`);
  }
  try {
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.ondataavailable = (event) => chunks.push(event.data);
    const stopped = new Promise((resolve) => { recorder.onstop = resolve; });
    recorder.start();
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
    recorder.stop();
    await stopped;
    const blob = new Blob(chunks, { type: recorder.mimeType });
    return await decodeToMono16k(await blob.arrayBuffer());
  } finally {
    for (const track of stream.getTracks()) track.stop();
  }
}
