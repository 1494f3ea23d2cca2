// The cross-runtime cases (written by tests/test_js.py), run the same way in node and in a browser.
//
// A manifest lists cases: a web-form graph, its task files, inputs, and the Python runtime's outputs
// for each task and for a task per row. `runCase` runs one with any `ort` and file reader;
// `mismatches` compares the results with the Python outputs.

import { VeraSession } from '../vera.mjs';

export const TOLERANCE = 1e-5; // relative to the largest |output|

function tensorOf(ort, spec) {
  const data = spec.dtype === 'int64' ? BigInt64Array.from(spec.data, BigInt)
    : spec.dtype === 'int32' ? Int32Array.from(spec.data) : Float32Array.from(spec.data);
  return new ort.Tensor(spec.dtype, data, spec.dims);
}

export function feedsOf(ort, inputs) {
  return Object.fromEntries(Object.entries(inputs).map(([name, spec]) => [name, tensorOf(ort, spec)]));
}

/** Load the case's graph and tasks, run every expected choice; returns {key: {output: {dims, data}}}. */
export async function runCase(ort, read, testCase, sessionOptions = {}) {
  const session = await VeraSession.create(ort, await read(testCase.graph), sessionOptions, testCase.graph);
  for (const [name, file] of Object.entries(testCase.tasks)) session.loadTask(name, await read(file), file);
  const feeds = feedsOf(ort, testCase.inputs);
  const results = {};
  for (const [key, choice] of Object.entries(testCase.choices)) {
    const outputs = await session.run(feeds, choice);
    results[key] = Object.fromEntries(Object.entries(outputs).map(([name, t]) => [name, { dims: [...t.dims], data: Array.from(t.data) }]));
  }
  return results;
}

/** Every output that differs from Python's by more than the tolerance, in words (empty: all match). */
export function mismatches(testCase, results, tolerance = TOLERANCE) {
  const problems = [];
  for (const [key, outputs] of Object.entries(testCase.expected)) {
    for (const [name, want] of Object.entries(outputs)) {
      const got = results[key]?.[name];
      if (!got || got.dims.join() !== want.dims.join()) {
        problems.push(`${testCase.name} ${key} ${name}: shape ${got?.dims} != ${want.dims}`);
        continue;
      }
      const scale = Math.max(...want.data.map(Math.abs), 1e-6);
      const worst = Math.max(...want.data.map((w, i) => Math.abs(got.data[i] - w)));
      if (!(worst <= tolerance * scale)) problems.push(`${testCase.name} ${key} ${name}: max |diff| ${worst} > ${tolerance} x ${scale}`);
    }
  }
  return problems;
}
