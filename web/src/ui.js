// The page: pick a WAV file or record the microphone, see the emotion probabilities. Nothing is sent anywhere.
import { decodeToMono16k, recordMicrophone, SAMPLE_RATE } from './audio.js';
import { loadModel } from './model.js';

const $ = (id) => document.getElementById(id);
const percent = (p) => `${(100 * p).toFixed(1)} %`;

/** Show the page's state (loading, ready, busy, done, error) in words, and as data-state for styles and scripts. */
function say(text, state, source = '') {
  $('status').textContent = text;
  Object.assign($('status').dataset, { state, source });
}

/** One labelled meter per class (text value beside it), the top class first in the heading. */
function show(labels, probabilities, details) {
  const order = [...labels.keys()].sort((a, b) => probabilities[b] - probabilities[a]);
  $('top').textContent = `${labels[order[0]]} (${percent(probabilities[order[0]])})`;
  $('top').dataset.label = labels[order[0]];
  const rows = labels.map((label, i) => {
    const row = document.createElement('li');
    const name = Object.assign(document.createElement('span'), { id: `class-${i}`, className: 'label', textContent: label });
    const meter = Object.assign(document.createElement('meter'), { min: 0, max: 1, value: probabilities[i] });
    meter.setAttribute('aria-labelledby', `class-${i}`);
    meter.dataset.label = label;
    const value = Object.assign(document.createElement('span'), { className: 'value', textContent: percent(probabilities[i]) });
    row.append(name, meter, value);
    return row;
  });
  $('bars').replaceChildren(...rows);
  $('details').textContent = details;
  $('result').hidden = false;
}

/** Get a wave (saying what is happening), classify it and show the result; the inputs wait meanwhile. */
async function classify(model, source, busy, getWave) {
  $('file').disabled = $('record').disabled = true;
  try {
    say(busy, 'busy', source);
    const wave = await getWave();
    const started = performance.now();
    const probabilities = await model.classify(wave);
    const ms = performance.now() - started;
    $('result').dataset.inferenceMs = ms.toFixed(1);
    show(model.labels, probabilities, `${source}: ${(wave.length / SAMPLE_RATE).toFixed(2)} s at 16 kHz ` +
      `(${wave.length} samples), classified in ${ms.toFixed(0)} ms.`);
    say(`Done: ${source}.`, 'done', source);
  } catch (err) {
    say(err.message, 'error', source);
  } finally {
    $('file').disabled = $('record').disabled = false;
  }
}

async function main() {
  const started = performance.now();
  let model;
  try {
    model = await loadModel();
  } catch (err) {
    say(`The model did not load: ${err.message}`, 'error');
    return;
  }
  document.body.dataset.loadMs = (performance.now() - started).toFixed(1);
  say(`Model ready: ${model.labels.length} emotions. Choose a WAV file or record.`, 'ready');
  $('file').disabled = $('record').disabled = false;
  $('file').addEventListener('change', () => {
    const [file] = $('file').files;
    if (file) classify(model, file.name, `Decoding ${file.name}…`, async () => decodeToMono16k(await file.arrayBuffer()));
  });
  $('record').addEventListener('click', () => {
    const seconds = Number($('seconds').value);
    classify(model, 'the microphone', `Recording ${seconds} s…`, () => recordMicrophone(seconds));
  });
}

main();
