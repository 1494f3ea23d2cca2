// vera-runtime for JavaScript: one vera-export graph, many tasks, switched per call or per batch row.
//
// Works with onnxruntime-node and onnxruntime-web alike: pass the `ort` module you use. No other
// dependency. The graph must be the web form (`vera-export convert m.onnx --to web --out m.web.onnx`):
// both JS packages hide inputs that have a default initializer, and node then silently ignores the
// task's vectors. Task files are the graph's own `.task.safetensors`, checked as the Python runtime
// checks them. See docs/contract.md.

export const CONTRACT_VERSION = '1';
const TASK_FORMAT = 'vera-task';
const TASK_NAME = /^[A-Za-z0-9_-]{1,64}$/;
const MAX_HEADER = 100 * 1024 * 1024;
const DIGEST_KEY = 'vera.tensors_sha256'; // SHA-256 of a native task file's tensors (vera_runtime._taskfile)
const utf8encode = new TextEncoder();

export class ContractError extends Error { name = 'ContractError'; }
export class TaskFileError extends Error { name = 'TaskFileError'; }
export class FeedError extends Error { name = 'FeedError'; }

// ---------------------------------------------------------------------------------------------
// The contract, from the ONNX file's top-level metadata_props (ModelProto field 14), without
// parsing the graph: a minimal protobuf walk over the top-level fields only.

function readVarint(bytes, at) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (at >= bytes.length) throw new ContractError('truncated protobuf varint');
    const byte = bytes[at++];
    value += (byte & 0x7f) * scale;
    if (byte < 0x80) return [value, at];
    scale *= 128;
    if (scale > 2 ** 56) throw new ContractError('protobuf varint too long');
  }
}

function* protoFields(bytes, start = 0, end = bytes.length) {
  let at = start;
  while (at < end) {
    let key;
    [key, at] = readVarint(bytes, at);
    const field = Math.floor(key / 8);
    const wire = key % 8;
    if (wire === 0) { [, at] = readVarint(bytes, at); continue; }
    if (wire === 1) { at += 8; continue; }
    if (wire === 5) { at += 4; continue; }
    if (wire !== 2) throw new ContractError(`unsupported protobuf wire type ${wire}`);
    let length;
    [length, at] = readVarint(bytes, at);
    if (at + length > end) throw new ContractError('truncated protobuf field');
    yield [field, bytes.subarray(at, at + length)];
    at += length;
  }
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** The `metadata_props` of an ONNX file, as an object of strings. */
export function readMetadata(modelBytes) {
  const metadata = {};
  for (const [field, value] of protoFields(modelBytes)) {
    if (field !== 14) continue;
    const entry = {};
    for (const [sub, text] of protoFields(value)) entry[sub] = utf8.decode(text);
    metadata[entry[1] ?? ''] = entry[2] ?? '';
  }
  return metadata;
}

function jsonOr(text, fallback) {
  return text ? JSON.parse(text) : fallback;
}

/** The graph contract (docs/contract.md) from a vera-export graph's bytes. */
export function readContract(modelBytes, source = 'the graph') {
  const metadata = readMetadata(modelBytes);
  const version = metadata['vera.contract_version'];
  if (version === undefined) {
    throw new ContractError(`${source} carries no 'vera.contract_version' metadata: it was not written by vera-export.`);
  }
  if (version !== CONTRACT_VERSION) {
    throw new ContractError(`${source} follows graph contract version ${version}; this runtime reads ` +
      `version ${CONTRACT_VERSION}. Upgrade vera-runtime or re-export the model.`);
  }
  try {
    const contract = {
      r: Number.parseInt(metadata['vera.r'], 10),
      layers: JSON.parse(metadata['vera.layers']),
      heads: jsonOr(metadata['vera.heads'], []),
      defaultTask: metadata['vera.default_task'],
      fingerprint: metadata['vera.fingerprint'],
      baseDigest: metadata['vera.base_digest'] || null,
      inputHighs: jsonOr(metadata['vera.input_highs'], {}),
      dimLimits: jsonOr(metadata['vera.dim_limits'], {}),
      taskDefaults: (metadata['vera.task_defaults'] || 'graph') === 'graph',
      weightDtype: metadata['vera.weights'] || 'float32',
    };
    if (!Number.isInteger(contract.r) || !contract.fingerprint || !Array.isArray(contract.layers)) throw new Error('r, layers or fingerprint');
    contract.taskShapes = taskShapes(contract);
    return contract;
  } catch (error) {
    throw new ContractError(`${source} has malformed vera metadata (${error.message}): re-export it.`);
  }
}

function taskShapes(contract) {
  const shapes = new Map();
  for (const layer of contract.layers) {
    shapes.set(`${layer.name}.vera_lambda_d`, [contract.r]);
    shapes.set(`${layer.name}.vera_lambda_b`, [layer.out_features]);
  }
  for (const head of contract.heads) {
    shapes.set(`${head.name}.weight`, [head.out_features, head.in_features]);
    if (head.bias) shapes.set(`${head.name}.bias`, [head.out_features]);
  }
  return shapes;
}

// ---------------------------------------------------------------------------------------------
// Task files (safetensors): 8-byte little-endian header length, a JSON header, then the tensors.

function readSafetensors(bytes, source) {
  if (!(bytes instanceof Uint8Array) || bytes.length < 8) {
    throw new TaskFileError(`${source} is not a readable task file (truncated or corrupt?): under 8 bytes.`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (headerLength > MAX_HEADER || 8 + headerLength > bytes.length) {
    throw new TaskFileError(`${source} is not a readable task file (truncated or corrupt?): header of ${headerLength} bytes.`);
  }
  let header;
  try {
    header = JSON.parse(utf8.decode(bytes.subarray(8, 8 + headerLength)));
  } catch (error) {
    throw new TaskFileError(`${source} is not a readable task file (truncated or corrupt?): ${error.message}`);
  }
  if (header === null || typeof header !== 'object' || Array.isArray(header)) {
    throw new TaskFileError(`${source} is not a readable task file: its header is not a JSON object.`);
  }
  const { __metadata__: metadata = {}, ...entries } = header;
  const data = bytes.subarray(8 + headerLength);
  const tensors = new Map();
  for (const [name, entry] of Object.entries(entries)) tensors.set(name, tensorOf(name, entry, data, source));
  return { metadata: metadata ?? {}, tensors };
}

function tensorOf(name, entry, data, source) {
  const { dtype, shape, data_offsets: offsets } = entry ?? {};
  const validShape = Array.isArray(shape) && shape.every((d) => Number.isInteger(d) && d >= 0);
  const validOffsets = Array.isArray(offsets) && offsets.length === 2 && offsets.every(Number.isInteger) &&
    offsets[0] >= 0 && offsets[0] <= offsets[1] && offsets[1] <= data.length;
  if (!validShape || !validOffsets) {
    throw new TaskFileError(`${source} is not a readable task file (truncated or corrupt?): bad entry for '${name}'.`);
  }
  const size = shape.reduce((a, b) => a * b, 1);
  const itemSize = { F32: 4, F16: 2, BF16: 2, F64: 8, I64: 8, I32: 4 }[dtype] ?? 1;
  if (offsets[1] - offsets[0] !== size * itemSize) {
    throw new TaskFileError(`${source} is not a readable task file (truncated or corrupt?): '${name}' has the wrong byte length.`);
  }
  // slice() copies: the copy is aligned for a Float32Array whatever the header length was
  const bytes = data.slice(offsets[0], offsets[1]);
  const values = dtype === 'F32' ? new Float32Array(bytes.buffer) : null;
  return { dtype, shape, values, bytes };
}

// SHA-256 (FIPS 180-4), synchronous, for the digest native task files carry: loadTask stays synchronous in
// browsers, where crypto.subtle.digest is asynchronous only.
const SHA_K = new Uint32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01,
  0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc,
  0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
  0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08,
  0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
  0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
const ror = (x, n) => (x >>> n) | (x << (32 - n));

function sha256Hex(bytes) {
  const padded = new Uint8Array(((bytes.length + 72) >> 6) << 6);
  padded.set(bytes);
  padded[bytes.length] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(bytes.length / 0x20000000));
  view.setUint32(padded.length - 4, (bytes.length << 3) >>> 0);
  const hash = new Uint32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  const w = new Uint32Array(64);
  for (let block = 0; block < padded.length; block += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(block + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, h] = hash;
    for (let i = 0; i < 64; i++) {
      const t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[i] + w[i];
      const t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      [h, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    [a, b, c, d, e, f, g, h].forEach((value, i) => { hash[i] += value; });
  }
  return Array.from(hash, (x) => x.toString(16).padStart(8, '0')).join('');
}

/** The digest vera_runtime writes (``tensors_digest``): each tensor in name order, name, dtype, shape, bytes. */
function tensorsDigest(tensors) {
  const parts = [utf8encode.encode('vera-export task tensors v1\0')];
  for (const name of [...tensors.keys()].sort()) {
    const tensor = tensors.get(name);
    parts.push(utf8encode.encode(`${name}\0<f4[${tensor.shape.join(', ')}]\0`), tensor.bytes);
  }
  const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((at, part) => { all.set(part, at); return at + part.length; }, 0);
  return sha256Hex(all);
}

function describe(tensor) {
  return `${{ F32: 'float32', F16: 'float16', F64: 'float64' }[tensor.dtype] ?? tensor.dtype}[${tensor.shape.join(', ')}]`;
}

/** Read and check one task file against `contract`; returns Map<input name, Float32Array>. */
export function readTask(bytes, contract, source = 'task file') {
  const { metadata, tensors } = readSafetensors(bytes, source);
  const ours = metadata.format === TASK_FORMAT || Object.keys(metadata).some((k) => k.startsWith('vera.'));
  if (!ours) throw new TaskFileError(`${source} is a safetensors file but not a vera-export task file.`);
  if (metadata.format !== TASK_FORMAT) {
    throw new TaskFileError(`${source} carries vera-export metadata but not format='${TASK_FORMAT}': it is damaged` +
      ' or was edited; re-export the task with `vera-export task`.');
  }
  if (metadata['vera.contract_version'] !== CONTRACT_VERSION) {
    throw new TaskFileError(`${source} follows task contract version '${metadata['vera.contract_version']}'; this ` +
      `runtime reads version ${CONTRACT_VERSION}. Re-export the task, or upgrade vera-runtime.`);
  }
  checkFingerprint(metadata, contract, source);
  const missing = [...contract.taskShapes.keys()].filter((k) => !tensors.has(k)).sort();
  const unknown = [...tensors.keys()].filter((k) => !contract.taskShapes.has(k)).sort();
  if (missing.length || unknown.length) {
    const detail = missing.length ? `missing ${JSON.stringify(missing.slice(0, 3))}` : `unknown ${JSON.stringify(unknown.slice(0, 3))}`;
    throw new TaskFileError(`${source} does not match the graph's layers: ${detail} tensors.`);
  }
  const values = new Map();
  for (const [name, shape] of contract.taskShapes) {
    const tensor = tensors.get(name);
    if (tensor.dtype !== 'F32' || tensor.shape.join() !== shape.join()) {
      throw new TaskFileError(`${source}: tensor '${name}' is ${describe(tensor)}, the graph needs float32[${shape.join(', ')}].`);
    }
  }
  checkDigest(metadata, tensors, source);
  for (const [name, tensor] of tensors) {
    if (!tensor.values.every(Number.isFinite)) throw new TaskFileError(`${source}: tensor '${name}' holds NaN or Inf values.`);
    values.set(name, tensor.values);
  }
  return values;
}

function checkDigest(metadata, tensors, source) {
  const recorded = metadata[DIGEST_KEY];
  if (!recorded) {
    throw new TaskFileError(`${source} carries no digest of its tensors ('${DIGEST_KEY}'), so a changed byte could not ` +
      'be noticed: it was written by vera-export 0.1 or edited. Re-export the task with `vera-export task`.');
  }
  if (tensorsDigest(tensors) !== recorded) {
    throw new TaskFileError(`${source}: its tensors do not match the digest it was written with: the file was damaged ` +
      'or edited after export. Re-export the task with `vera-export task`, or copy it again.');
  }
}

function checkFingerprint(metadata, contract, source) {
  const fingerprint = metadata['vera.fingerprint'] ?? '';
  if (fingerprint === contract.fingerprint) return;
  const digest = metadata['vera.base_digest'];
  const otherBase = digest && contract.baseDigest && digest !== contract.baseDigest
    ? `; it was trained over other base weights (digest ${digest.slice(0, 12)}, this graph's base is ` +
      `${contract.baseDigest.slice(0, 12)}), and a task only fits the base model it was trained on`
    : '';
  throw new TaskFileError(`${source} was made for another graph (fingerprint ${fingerprint.slice(0, 12)}, this graph ` +
    `has ${contract.fingerprint.slice(0, 12)})${otherBase}: use the task files exported with this graph, or ` +
    're-export the task against it.');
}

// ---------------------------------------------------------------------------------------------

export class VeraSession {
  /**
   * Load a vera-export graph (web form) with `ort` (onnxruntime-node or onnxruntime-web).
   * `model`: the .onnx file's bytes (Uint8Array). `sessionOptions` go to ort.InferenceSession.create.
   */
  static async create(ort, model, sessionOptions = {}, source = 'the graph') {
    const contract = readContract(model, source);
    const session = await ort.InferenceSession.create(model, sessionOptions);
    const hidden = [...contract.taskShapes.keys()].filter((name) => !session.inputNames.includes(name));
    if (hidden.length || contract.taskDefaults) {
      await session.release?.();
      throw new ContractError(`${source} keeps default values for its task inputs, which onnxruntime's JavaScript ` +
        `packages hide (node then ignores every task silently; '${hidden[0] ?? 'λ'}'): convert it with ` +
        '`vera-export convert m.onnx --to web --out m.web.onnx` and load m.web.onnx.');
    }
    return new VeraSession(ort, session, contract);
  }

  constructor(ort, session, contract) {
    this.ort = ort;
    this.session = session;
    this.contract = contract;
    this.inputNames = session.inputNames.filter((name) => !contract.taskShapes.has(name));
    // shapes with symbolic dimensions by name (session.inputMetadata; releases without it: unchecked)
    const metadata = session.inputMetadata ?? [];
    this._shapes = new Map(metadata.filter((m) => m.isTensor && this.inputNames.includes(m.name)).map((m) => [m.name, m.shape]));
    this.outputNames = [...session.outputNames];
    this._tasks = new Map(); // name -> { values: Map<input, Float32Array>, feeds: {input: ort.Tensor} }
  }

  get tasks() { return [...this._tasks.keys()]; }
  get defaultTask() { return this.contract.defaultTask; }

  /** Load (or replace) task `name` from a task file's bytes; a bad file changes nothing. */
  loadTask(name, bytes, source = `task file for '${name}'`) {
    if (typeof name !== 'string' || !TASK_NAME.test(name)) {
      throw new TaskFileError(`task name ${JSON.stringify(name)} is not allowed: use 1-64 letters, digits, '_' or '-'.`);
    }
    const values = readTask(bytes, this.contract, source);
    const feeds = {};
    for (const [input, array] of values) feeds[input] = new this.ort.Tensor('float32', array, [1, ...this.contract.taskShapes.get(input)]);
    this._tasks.set(name, { values, feeds });
  }

  unloadTask(name) {
    if (!this._tasks.delete(name)) throw new FeedError(`task '${name}' is not loaded; loaded tasks: ${JSON.stringify(this.tasks)}.`);
  }

  _get(name) {
    const task = this._tasks.get(name);
    if (!task) throw new FeedError(`task '${name}' is not loaded; loaded tasks: ${JSON.stringify(this.tasks)}. Use loadTask().`);
    return task;
  }

  /** The task inputs for one task (`task`), or one task per batch row (`tasks`). */
  taskFeeds({ task, tasks } = {}, batch = undefined) {
    if (task !== undefined && tasks !== undefined) throw new FeedError('give task for the whole batch or tasks (one per row), not both.');
    if (tasks !== undefined) {
      if (!Array.isArray(tasks) || !tasks.every((t) => typeof t === 'string')) throw new FeedError('tasks takes an array of task names, one per row.');
      if (batch !== undefined && tasks.length !== batch) throw new FeedError(`tasks gives ${tasks.length} names for a batch of ${batch} rows: give one per row.`);
      if (new Set(tasks).size > 1) return this._rowFeeds(tasks);
      task = tasks[0];
    }
    if (task !== undefined && typeof task !== 'string') throw new FeedError('task takes one task name (a string); for a task per row use tasks.');
    return this._get(task ?? this.defaultTask).feeds;
  }

  _rowFeeds(tasks) {
    const loaded = tasks.map((name) => this._get(name));
    const feeds = {};
    for (const [input, shape] of this.contract.taskShapes) {
      const size = shape.reduce((a, b) => a * b, 1);
      const stacked = new Float32Array(size * tasks.length);
      loaded.forEach((t, row) => stacked.set(t.values.get(input), row * size));
      feeds[input] = new this.ort.Tensor('float32', stacked, [tasks.length, ...shape]);
    }
    return feeds;
  }

  /** Run model inputs `feeds` ({name: ort.Tensor}) with `{task}` or `{tasks: [one per row]}` (default task otherwise). */
  async run(feeds, choice = {}) {
    const batch = this._checkFeeds(feeds);
    return this.session.run({ ...feeds, ...this.taskFeeds(choice, batch) });
  }

  _checkFeeds(feeds) {
    if (feeds === null || typeof feeds !== 'object') throw new FeedError('feeds takes an object of input name -> ort.Tensor.');
    for (const name of Object.keys(feeds)) {
      if (this.contract.taskShapes.has(name)) throw new FeedError(`'${name}' is a task input: choose the task with run(feeds, {task}), don't feed it.`);
      if (!this.inputNames.includes(name)) throw new FeedError(`the graph has no input '${name}'; its inputs are ${JSON.stringify(this.inputNames)}.`);
    }
    const missing = this.inputNames.filter((name) => !(name in feeds));
    if (missing.length) throw new FeedError(`missing input ${missing.map((m) => `'${m}'`).join(', ')}.`);
    for (const [name, high] of Object.entries(this.contract.inputHighs)) {
      const data = feeds[name]?.data;
      if (!data) continue;
      for (const value of data) {
        if (value < 0 || value >= high) throw new FeedError(`input '${name}' holds ${value}, outside the model's vocabulary [0, ${high}): check the tokenizer matches the model.`);
      }
    }
    this._checkShapes(feeds);
    const first = feeds[this.inputNames[0]];
    const batch = first?.dims?.[0] ?? 1;
    if (batch === 0) throw new FeedError('the batch is empty (0 rows): give at least one row.');
    return batch;
  }

  /** Ranks, fixed dimensions, symbolic ones shared across inputs, and learned position limits. */
  _checkShapes(feeds) {
    const sizes = new Map(); // symbolic dimension -> [size, input that set it]
    for (const [name, shape] of this._shapes) {
      const dims = feeds[name]?.dims ?? [];
      const want = `[${shape.join(', ')}]`;
      if (dims.length !== shape.length || shape.some((d, i) => typeof d === 'number' && d >= 0 && d !== dims[i])) {
        throw new FeedError(`input '${name}' has shape [${dims.join(', ')}], the graph needs ${want}.`);
      }
      shape.forEach((d, i) => {
        if (typeof d !== 'string' || !d) return;
        const [seen, where] = sizes.get(d) ?? [dims[i], name];
        if (seen !== dims[i]) {
          throw new FeedError(`input '${name}' has ${d}=${dims[i]}, but '${where}' has ${d}=${seen}: inputs must agree on '${d}' (pad them to one length).`);
        }
        sizes.set(d, [seen, where]);
      });
    }
    for (const [dim, limit] of Object.entries(this.contract.dimLimits)) {
      const [size, where] = sizes.get(dim) ?? [0, ''];
      if (size > limit) throw new FeedError(`'${where}' has ${dim}=${size}, but the model has positions for ${limit}: truncate the input.`);
    }
  }
}
