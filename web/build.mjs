// Builds web/dist: the page's modules bundled with onnxruntime-web by esbuild, its WASM binary beside them,
// and build.json, the hash of everything the build read (clients/web.py refuses a dist older than its sources).
import { createHash } from 'node:crypto';
import { copyFileSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import * as esbuild from 'esbuild';

const DIST = 'dist';
const STATIC = ['index.html', 'style.css', 'favicon.svg'];
const WASM = 'node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm';

/** SHA-256 over each source's path and SHA-256, in path order (clients/web.py computes the same). */
function sourcesHash() {
  const files = ['build.mjs', 'package.json', 'package-lock.json', ...readdirSync('src').map((f) => join('src', f))];
  const digest = createHash('sha256');
  for (const file of files.sort()) {
    digest.update(`${file}\0${createHash('sha256').update(readFileSync(file)).digest('hex')}\n`);
  }
  return digest.digest('hex');
}

rmSync(DIST, { recursive: true, force: true });
await esbuild.build({
  entryPoints: ['src/ui.js', 'src/audio.js'], // audio.js on its own too: scripts can import the page's decoder
  bundle: true,
  splitting: true,
  format: 'esm',
  target: 'es2022',
  minify: true,
  legalComments: 'eof',
  outdir: DIST,
  logLevel: 'warning',
});
for (const file of STATIC) copyFileSync(join('src', file), join(DIST, file));
copyFileSync(WASM, join(DIST, 'ort-wasm-simd-threaded.wasm'));
writeFileSync(join(DIST, 'build.json'), `${JSON.stringify({ sources: sourcesHash() }, null, 2)}\n`);
console.log(`built ${DIST}: ${readdirSync(DIST).sort().join(', ')}`);
