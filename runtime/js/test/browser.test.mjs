// vera.mjs with onnxruntime-web (wasm) in a real headless Chromium, against the Python runtime's
// outputs. The page, vera.mjs, onnxruntime-web and the fixtures are served on 127.0.0.1.

import assert from 'node:assert/strict';
import { createReadStream, existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { TOLERANCE, mismatches } from './cases.mjs';
import { findChromium } from './chromium.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOTS = {
  '/vera/': path.resolve(HERE, '..'),
  '/ort/': path.resolve(HERE, '../node_modules/onnxruntime-web/dist'),
  '/fixtures/': process.env.VERA_JS_FIXTURES,
};
const TYPES = { '.mjs': 'text/javascript', '.js': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json', '.html': 'text/html' };
const PAGE = `<!doctype html><meta charset="utf-8"><title>vera-runtime</title><script type="module">
import * as ort from '/ort/ort.wasm.min.mjs';
import { runCase } from '/vera/test/cases.mjs';
ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.numThreads = 1;
const read = async (file) => new Uint8Array(await (await fetch('/fixtures/' + file)).arrayBuffer());
try {
  const manifest = await (await fetch('/fixtures/manifest.json')).json();
  const results = {};
  for (const testCase of manifest.cases) results[testCase.name] = await runCase(ort, read, testCase);
  window.veraResults = { results };
} catch (error) {
  window.veraResults = { error: String(error && error.stack || error) };
}
</script>`;

function serve() {
  const server = http.createServer((request, response) => {
    const url = new URL(request.url, 'http://127.0.0.1');
    if (url.pathname === '/') return response.writeHead(200, { 'content-type': 'text/html' }).end(PAGE);
    const prefix = Object.keys(ROOTS).find((p) => url.pathname.startsWith(p));
    const root = prefix && ROOTS[prefix];
    const file = root && path.resolve(root, '.' + decodeURIComponent(url.pathname.slice(prefix.length - 1)));
    if (!file || !file.startsWith(root + path.sep) || !existsSync(file)) return response.writeHead(404).end();
    response.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
    createReadStream(file).pipe(response);
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

const browserPath = findChromium();
const skip = !process.env.VERA_JS_FIXTURES ? 'set VERA_JS_FIXTURES (tests/test_js.py writes them)'
  : !browserPath ? 'no chromium: apt-get install chromium (or set CHROMIUM)' : false;

test('onnxruntime-web in headless Chromium equals the Python runtime, per task and per row', { skip, timeout: 300_000 }, async () => {
  const { default: puppeteer } = await import('puppeteer-core');
  const manifest = JSON.parse(await readFile(path.join(process.env.VERA_JS_FIXTURES, 'manifest.json'), 'utf8'));
  const server = await serve();
  const browser = await puppeteer.launch({ executablePath: browserPath, headless: true, args: ['--no-sandbox'] });
  try {
    const page = await browser.newPage();
    page.on('console', (message) => console.log(`[chromium] ${message.text()}`));
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    await page.waitForFunction('window.veraResults !== undefined', { timeout: 240_000, polling: 200 });
    const { results, error } = await page.evaluate(() => window.veraResults);
    assert.equal(error, undefined);
    for (const testCase of manifest.cases) {
      assert.deepEqual(mismatches(testCase, results[testCase.name], testCase.web_tolerance ?? TOLERANCE), []);
      const [first, second] = Object.keys(testCase.choices);
      assert.notDeepEqual(results[testCase.name][first], results[testCase.name][second], 'switching the task must change the output');
    }
  } finally {
    await browser.close();
    server.close();
  }
});
