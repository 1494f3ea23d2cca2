// vera.mjs with onnxruntime-node, against the Python runtime's outputs (fixtures: tests/test_js.py).

import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';

import * as ort from 'onnxruntime-node';

import { ContractError, FeedError, TaskFileError, VeraSession } from '../vera.mjs';
import { feedsOf, mismatches, runCase } from './cases.mjs';

const FIXTURES = process.env.VERA_JS_FIXTURES;
const skip = FIXTURES ? false : 'set VERA_JS_FIXTURES (tests/test_js.py writes them)';
const read = async (file) => new Uint8Array(await readFile(path.join(FIXTURES, file)));
const manifest = FIXTURES ? JSON.parse(await readFile(path.join(FIXTURES, 'manifest.json'), 'utf8')) : { cases: [] };

for (const testCase of manifest.cases) {
  test(`${testCase.name}: every task and a task per row equal the Python runtime`, { skip }, async () => {
    const results = await runCase(ort, read, testCase);
    assert.deepEqual(mismatches(testCase, results), []);
    const [first, second] = Object.keys(testCase.choices);
    assert.notDeepEqual(results[first], results[second], 'switching the task must change the output');
  });
}

test('refusals: a graph with task defaults, foreign, damaged, tampered and NaN task files', { skip }, async () => {
  const refusals = manifest.refusals;
  await assert.rejects(VeraSession.create(ort, await read(refusals.graph_with_defaults)), (error) =>
    error instanceof ContractError && error.message.includes('--to web'));
  const testCase = manifest.cases[0];
  const session = await VeraSession.create(ort, await read(testCase.graph));
  const [name, file] = Object.entries(testCase.tasks)[0];
  const good = await read(file);
  session.loadTask(name, good);
  const before = await session.run(feedsOf(ort, testCase.inputs), { task: name });
  const expect = { foreign: 'was made for another graph', nan: 'holds NaN or Inf', truncated: 'truncated or corrupt',
    not_a_task: 'not a vera-export task file', wrong_shape: 'the graph needs float32',
    tampered: 'do not match the digest it was written with' };
  for (const [kind, words] of Object.entries(expect)) {
    const bad = await read(refusals[kind]);
    assert.throws(() => session.loadTask(name, bad, refusals[kind]), (error) =>
      error instanceof TaskFileError && error.message.includes(words) && error.message.includes(refusals[kind]), kind);
  }
  const after = await session.run(feedsOf(ort, testCase.inputs), { task: name });
  assert.deepEqual(Array.from(after[session.outputNames[0]].data), Array.from(before[session.outputNames[0]].data),
    'a failed load keeps the loaded task');
  assert.throws(() => session.taskFeeds({ task: 'nope' }), FeedError);
  assert.throws(() => session.loadTask('has.dot', good), TaskFileError);
  await assert.rejects(session.run({ ...feedsOf(ort, testCase.inputs), [session.contract.layers[0].name + '.vera_lambda_d']: 1 }), FeedError);
  await assert.rejects(session.run(feedsOf(ort, testCase.inputs), { tasks: [name] }), /one per row/);
  const [input, spec] = Object.entries(testCase.inputs)[0];
  const longer = { ...spec, dims: [spec.dims[0], spec.dims[1] + 1], data: Array(spec.dims[0] * (spec.dims[1] + 1)).fill(1) };
  const others = Object.keys(testCase.inputs).length > 1;
  if (others) {
    await assert.rejects(session.run(feedsOf(ort, { ...testCase.inputs, [input]: longer }), { task: name }), /must agree on 'sequence'/);
  }
  const limit = session.contract.dimLimits.sequence;
  if (limit) {
    const tooLong = Object.fromEntries(Object.entries(testCase.inputs).map(([k, v]) =>
      [k, { ...v, dims: [1, limit + 1], data: Array(limit + 1).fill(1) }]));
    await assert.rejects(session.run(feedsOf(ort, tooLong), { task: name }), new RegExp(`positions for ${limit}`));
  }
  assert.ok(others || limit, 'the first case exercises the shape checks');
});
