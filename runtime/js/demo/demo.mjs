// The vera-run demo page: one web-form classifier graph, every task run on the text as you type, in one
// call with a task per batch row. Plain ES modules, no build step; every file comes from the server that
// served the page (vera-run demo), which also writes /model/manifest.json.
//
// window.veraDemo, for tests and your own scripts:
//   ready            a promise, resolved once the graph and every task are loaded (rejected on failure)
//   tasks()          the task names (none before ready)
//   run(text, task)  -> {label, scores, probabilities, ms}: scores are the graph's logits for the text
//   runAll(text)     -> {task: {label, scores, probabilities}, ms}: every task in one call, a task per row

import * as ort from '/ort/ort.wasm.min.mjs';
import { Tokenizer } from '/tokenizers/tokenizers.min.mjs';
import { VeraSession } from '/vera.mjs';

ort.env.wasm.wasmPaths = '/ort/';
ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one thread keeps the page plain

const $ = (selector) => document.querySelector(selector);

async function fetchOk(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response;
}
const bytes = async (path) => new Uint8Array(await (await fetchOk(path)).arrayBuffer());
const json = async (path) => (await fetchOk(path)).json();

async function load() {
  const manifest = await json('/model/manifest.json');
  const [tokenizerJson, tokenizerConfig] = await Promise.all(
    ['tokenizer.json', 'tokenizer_config.json'].map((name) => (manifest.tokenizer.includes(name) ? json(`/model/${name}`) : {})));
  const options = manifest.data ? { externalData: [{ path: manifest.data, data: `/model/${manifest.data}` }] } : {};
  const session = await VeraSession.create(ort, await bytes(`/model/${manifest.graph}`), options, manifest.graph);
  for (const [name, file] of Object.entries(manifest.tasks)) session.loadTask(name, await bytes(`/model/${file}`), file);
  return { manifest, session, tokenizer: new Tokenizer(tokenizerJson, tokenizerConfig) };
}

/** The model inputs for `rows` copies of the text's token ids: ids, masks of ones, other inputs zero. */
function feedsFor(demo, text, rows) {
  const ids = demo.tokenizer.encode(text).ids.slice(0, demo.manifest.max_sequence);
  const shape = [rows, ids.length];
  const filled = (value) => new BigInt64Array(rows * ids.length).fill(BigInt(value));
  const feeds = {};
  for (const name of demo.session.inputNames) {
    if (name === 'input_ids') {
      const data = new BigInt64Array(rows * ids.length);
      for (let row = 0; row < rows; row++) data.set(ids.map(BigInt), row * ids.length);
      feeds[name] = new ort.Tensor('int64', data, shape);
    } else {
      feeds[name] = new ort.Tensor('int64', filled(name.includes('mask') ? 1 : 0), shape);
    }
  }
  return feeds;
}

function softmax(values) {
  const top = Math.max(...values);
  const exps = values.map((v) => Math.exp(v - top));
  const sum = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / sum);
}

/** Row `row` of the first output, as the prediction of `task`. */
function prediction(demo, outputs, task, row) {
  const logits = outputs[demo.session.outputNames[0]];
  const width = logits.dims[logits.dims.length - 1];
  const scores = Array.from(logits.data.slice(row * width, (row + 1) * width));
  const labels = demo.manifest.labels[task];
  const best = scores.indexOf(Math.max(...scores));
  return { label: labels[best] ?? String(best), scores, probabilities: softmax(scores) };
}

async function run(demo, text, task) {
  const start = performance.now();
  const outputs = await demo.session.run(feedsFor(demo, text, 1), { task });
  return { ...prediction(demo, outputs, task, 0), ms: performance.now() - start };
}

async function runAll(demo, text) {
  const tasks = demo.session.tasks;
  const start = performance.now();
  const outputs = await demo.session.run(feedsFor(demo, text, tasks.length), { tasks });
  const ms = performance.now() - start;
  return { ms, ...Object.fromEntries(tasks.map((task, row) => [task, prediction(demo, outputs, task, row)])) };
}

function bars(demo, task, probabilities) {
  const cell = document.createElement('td');
  demo.manifest.labels[task].forEach((label, i) => {
    const bar = document.createElement('div');
    bar.className = 'bar';
    const name = Object.assign(document.createElement('span'), { className: 'name', textContent: label });
    const fill = Object.assign(document.createElement('span'), { className: 'fill' });
    fill.style.width = `${Math.round(probabilities[i] * 100) / 10}rem`;
    const share = Object.assign(document.createElement('span'), { textContent: `${(probabilities[i] * 100).toFixed(0)}%` });
    bar.append(name, fill, share);
    cell.append(bar);
  });
  return cell;
}

function render(demo, results, selected) {
  const body = $('#tasks tbody');
  body.replaceChildren();
  for (const task of demo.session.tasks) {
    const row = document.createElement('tr');
    row.className = task === selected ? 'active' : '';
    row.dataset.task = task;
    const name = Object.assign(document.createElement('td'), { textContent: task });
    const label = Object.assign(document.createElement('td'), { className: 'prediction', textContent: results[task].label });
    row.append(name, label, bars(demo, task, results[task].probabilities));
    body.append(row);
  }
}

function wire(demo) {
  const box = $('#text');
  let selected = null;
  let pending = Promise.resolve();
  const timing = { all: null, one: null };
  const showTiming = () => {
    const parts = [];
    if (timing.all !== null) parts.push(`all ${demo.session.tasks.length} tasks in one call: ${timing.all.toFixed(1)} ms`);
    if (timing.one !== null) parts.push(`switch to '${selected}' and run it alone: ${timing.one.toFixed(1)} ms`);
    $('#timing').textContent = parts.join(' · ');
  };
  const update = () => {
    pending = pending.then(async () => {
      const results = await runAll(demo, box.value);
      timing.all = results.ms;
      render(demo, results, selected);
      if (selected) timing.one = (await run(demo, box.value, selected)).ms;
      showTiming();
    }).catch(fail);
  };
  box.addEventListener('input', update);
  $('#tasks tbody').addEventListener('click', (event) => {
    const row = event.target.closest('tr');
    if (!row) return;
    selected = row.dataset.task;
    update();
  });
  update();
}

function fail(error) {
  const status = $('#status');
  status.className = 'status error';
  status.textContent = `Failed: ${error && error.message || error}`;
}

let loaded = null;
const ready = load().then((demo) => {
  loaded = demo;
  $('#status').textContent = `${demo.manifest.graph}: ${demo.session.tasks.length} tasks loaded (${demo.session.tasks.join(', ')}).`;
  wire(demo);
  return demo;
});
ready.catch(fail);

window.veraDemo = {
  ready: ready.then(() => true),
  tasks: () => (loaded ? loaded.session.tasks : []),
  run: async (text, task) => run(await ready, text, task),
  runAll: async (text) => runAll(await ready, text),
};
