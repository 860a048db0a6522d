// The release's emotion model in onnxruntime-web (WASM backend, single-threaded), loaded from this origin.
import * as ort from 'onnxruntime-web/wasm';

/** Where the server puts the release's files (clients/web.py serves them there). */
const MODEL_URL = './release/emotion_model.onnx';
const LABELS_URL = './release/labels.json';

class ModelError extends Error {}

async function fetchLabels() {
  const response = await fetch(LABELS_URL);
  if (!response.ok) throw new ModelError(`labels.json: HTTP ${response.status}; serve a release with python -m clients.web`);
  const labels = await response.json();
  if (!Array.isArray(labels) || labels.length === 0 || !labels.every((l) => typeof l === 'string')) {
    throw new ModelError('labels.json is not a list of class names; the release is damaged, export it again');
  }
  return labels;
}

/** Load the model and its labels; returns {labels, classify(wave) -> Float32Array}. */
export async function loadModel() {
  // The WASM binary beside this file (its JS loader is in the bundle).
  ort.env.wasm.wasmPaths = { wasm: new URL('./ort-wasm-simd-threaded.wasm', import.meta.url).href };
  ort.env.wasm.numThreads = 1; // threads would need cross-origin isolation and workers; one utterance is small
  ort.env.wasm.proxy = false;
  const [labels, session] = await Promise.all([
    fetchLabels(),
    ort.InferenceSession.create(MODEL_URL, { executionProviders: ['wasm'] }),
  ]);
  return {
    labels,
    async classify(wave) {
      const feeds = { [session.inputNames[0]]: new ort.Tensor('float32', wave, [1, wave.length]) };
      const outputs = await session.run(feeds);
      const probabilities = outputs[session.outputNames[0]].data;
      if (probabilities.length !== labels.length) {
        throw new ModelError(`the model gives ${probabilities.length} probabilities but labels.json names ` +
          `${labels.length} classes; the release is damaged, export it again`);
      }
      return Float32Array.from(probabilities);
    },
  };
}
