// Node side of bench/targets.py: vera.mjs + onnxruntime-node on a web-form graph.
// node bench/node_latency.mjs CONFIG.json  ->  prints one JSON object
//   CONFIG: {graph, tasks: {name: file}, feeds: {batch: {input: {dtype, dims, data}}}, threads, repeats}

import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(HERE, '../runtime/js/package.json'));
const ort = require('onnxruntime-node');
const { VeraSession } = await import('../runtime/js/vera.mjs');
const { feedsOf } = await import('../runtime/js/test/cases.mjs');

const config = JSON.parse(await readFile(process.argv[2], 'utf8'));
const options = { intraOpNumThreads: config.threads, interOpNumThreads: 1, extra: { session: { intra_op: { allow_spinning: '0' } } } };
const session = await VeraSession.create(ort, new Uint8Array(await readFile(config.graph)), options, config.graph);
for (const [name, file] of Object.entries(config.tasks)) session.loadTask(name, new Uint8Array(await readFile(file)));
const [first, second] = Object.keys(config.tasks);

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const now = () => Number(process.hrtime.bigint()) / 1e9;

const result = { latency: {} };
for (const [batch, spec] of Object.entries(config.feeds)) {
  const feeds = feedsOf(ort, spec);
  for (let i = 0; i < 3; i++) await session.run(feeds, { task: first });
  const samples = [];
  for (let i = 0; i < config.repeats; i++) {
    const start = now();
    await session.run(feeds, { task: first });
    samples.push(now() - start);
  }
  result.latency[batch] = median(samples);
}
// a task switch: choosing the other preloaded task's tensors for the next run
const switches = [];
for (let i = 0; i < 200; i++) {
  const start = now();
  for (let j = 0; j < 1000; j++) session.taskFeeds({ task: j % 2 ? first : second });
  switches.push((now() - start) / 1000);
}
result.switch = median(switches);
console.log(JSON.stringify(result));
