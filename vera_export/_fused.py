"""``export_fused``: PEFT VeRA adapters over a decoder, as onnxruntime-genai's builder graph of the base
model (GroupQueryAttention, fused norms, packed projections; int4 ``MatMulNBits`` if asked) with the
VeRA branches grafted on — generation at the builder's speed, every task still an input.

1. Load the base and the adapters with PEFT; write the contract (the same fingerprint as a traced
   export of the same adapters: task files fit both graphs).
2. Run the builder on the base model (its own Python).
3. Graft the VeRA branches onto its projections; record the contract in the graph.
4. Check ONNX Runtime against PEFT for each task and a task per row, prefill and decode steps.
5. Publish the graph, genai_config.json, the tokenizer and every task's files as one set.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
from torch import nn

from vera_runtime import Contract
from vera_runtime.files import template_digest
from vera_runtime.layout import GENAI_CONFIG, CacheLayout, hot_template_path, task_file_paths

from ._builder import BUILDER_VERSION, builder_python, check_base, run_builder
from ._defaults import DEFAULT_TOLERANCE, FORM_TOLERANCES
from ._digest import base_digest
from ._discover import find_vera_layers
from ._errors import VeraExportError
from ._export import ExportResult, _contract, _require_pass, _stage_task, current_task, stage_task
from ._genai import stage_tokenizer_files
from ._graft import find_targets, graft, name_dims, set_contract
from ._passes import HOT_TEMPLATE_KEY
from ._peft import PeftExportResult, PeftRoot, _read_all, _stage_labels, load_peft_models, resolve_base
from ._staging import Staging, check_writable
from ._verify import Verification, ort_session
from ._verify_fused import verify_fused, verify_hot


def _widths(config) -> dict[str, int]:
    """Output columns of each projection the builder may pack: q, k, v, gate, up."""
    head_dim = _head_dim(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q, kv, inner = config.num_attention_heads * head_dim, kv_heads * head_dim, config.intermediate_size
    return {"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": inner, "up_proj": inner}


def _fused_contract(adapted, model: nn.Module, ir_model: ir.Model) -> Contract:
    """The traced export's contract, with the builder's bounds: token ids below the vocabulary, at most as
    many positions as its rotary tables hold, and a shared cache buffer that holds at least the sliding
    window of the layers that keep a window-sized cache."""
    contract = _contract(adapted, model, base_digest(model))
    config = model.config
    positions = ir_model.graph.initializers.get("cos_cache")
    limit = positions.shape[0] if positions is not None else config.max_position_embeddings
    windows = [node.attributes["local_window_size"].as_int() for node in ir_model.graph
               if node.op_type == "GroupQueryAttention" and "local_window_size" in node.attributes]
    return dataclasses.replace(contract, input_highs={"input_ids": config.vocab_size},
                               dim_limits={"total_sequence": int(limit)}, kv_shared_buffer=max([1, *windows]))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _cache_layout(config) -> CacheLayout:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return dataclasses.replace(CacheLayout.of_layers(config.num_hidden_layers, kv_heads, _head_dim(config)),
                               position_ids=False)


def _stage_genai_config(built: Path, graph: Path, stage: Staging) -> Path:
    """The builder's genai_config.json (it describes its graph), naming our graph file."""
    config = json.loads((built / GENAI_CONFIG).read_text())
    config["model"]["decoder"]["filename"] = graph.name
    stage.path(graph.with_name(GENAI_CONFIG)).write_text(json.dumps(config, indent=2) + "\n")
    return graph.with_name(GENAI_CONFIG)


def export_fused(
    adapters: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    model_class: str | None = None,
    precision: str = "fp32",
    builder: str | os.PathLike | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    hot_template: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> PeftExportResult:
    """Export PEFT VeRA adapters over a causal LM as the builder's fused decoder with VeRA branches.

    ``precision``: ``fp32``, or ``int4`` (the builder's MatMulNBits base weights; VeRA stays float32).
    ``builder``: the Python holding onnxruntime-genai (default ``$VERA_GENAI_PYTHON``, else this one).
    ``tolerance``: the largest difference from PEFT accepted, relative to the logits' scale (default 1e-5
    for fp32, 0.5 for int4 as ``convert --to int4``); a task per row must equal each task alone to 1e-5.
    ``hot_template``: also write ``<stem>.hot.onnx`` (a second copy of the weights), from which the runtime
    serves one task with its VeRA weights folded per builder MatMul (``VeraSession.specialize``).
    Writes ``out`` (+ ``.data``), ``genai_config.json``, the tokenizer and one task file per adapter.
    """
    start, out = time.perf_counter(), Path(out)
    # 1. Up-front checks, then the PEFT model and the contract's parts that need it.
    read = _read_all(adapters)
    base_path = resolve_base(base, read[0])
    check_writable(out, (*(a.path for a in read), base_path))
    check_base(base_path)
    python = builder_python(builder)
    progress(f"Loading the base model and {len(read)} adapter(s) ...")
    loaded = load_peft_models(read, base_path, model_class)
    root = PeftRoot(loaded.model)
    adapted = find_vera_layers(root, read[0].name)
    if adapted.heads:
        raise VeraExportError("--fused exports causal LMs; these adapters train head layers: export without --fused.")
    with Staging(out, replaces_set=True, inputs=(*(a.path for a in read), base_path)) as staging:
        scratch = staging.scratch()
        # 2. The builder's graph of the base model.
        progress(f"Building the base decoder with onnxruntime-genai {BUILDER_VERSION}'s builder ({precision}) ...")
        built = run_builder(python, base_path, scratch / "built", precision, scratch / "cache")
        ir_model = ir.load(built)
        # 3. Graft, and record the contract (the hot template first: the graph records its digest).
        contract = dataclasses.replace(_fused_contract(adapted, root, ir_model),
                                       weight_dtype="int4" if precision == "int4" else "float32")
        task = current_task(adapted, contract)
        targets = find_targets(ir_model, contract.layers, _widths(root.config))
        progress(f"Grafting {len(targets)} VeRA layers (r={contract.r}) onto {len(ir_model.graph)} builder nodes ...")
        branches = (adapted.vera_a.detach().numpy(), adapted.vera_b.detach().numpy(), task.tensors)
        label = f"onnxruntime-genai {BUILDER_VERSION} model builder, {precision}, cpu"
        if hot_template:
            hot_model = ir.load(built)
            hot_targets = find_targets(hot_model, contract.layers, _widths(root.config))
            names = graft(hot_model, hot_targets, *branches, hot=True)
            _finish(hot_model, root, contract, label)
            hot_model.metadata_props[HOT_TEMPLATE_KEY] = json.dumps(names)
            hot_path = scratch / hot_template_path(out).name
            ir.save(hot_model, hot_path, external_data=f"{hot_path.name}.data")
            del hot_model
            _move_to_data(hot_path, names)
            contract = dataclasses.replace(contract, hot_template_sha256=template_digest(hot_path))
        graft(ir_model, targets, *branches)
        _finish(ir_model, root, contract, label)
        ir.save(ir_model, scratch / out.name, external_data=f"{out.name}.data")
        del ir_model
        gc.collect()
        # 4. Every task, alone and one per row, against PEFT.
        verification = None
        if verify:
            progress("Verifying ONNX Runtime against PEFT (each task, a task per row; prefill and decode) ...")
            names = [adapter.name for adapter in read]
            default = DEFAULT_TOLERANCE if precision == "fp32" else FORM_TOLERANCES[precision]
            template = scratch / hot_template_path(out).name if hot_template else None
            verification = _verify(scratch / out.name, loaded.model, root, contract, names, tolerance or default,
                                   template)
        # 5. Stage the set.
        for written in sorted(scratch.iterdir()):
            if written.is_file():
                os.replace(written, staging.path(out.with_name(written.name)))
        _stage_genai_config(built.parent, out, staging)
        stage_tokenizer_files(out, base_path, staging)
        _stage_labels(out, read, loaded.model, contract, staging)
        task_files = [_stage_task(task, out, staging)[0]]
        for adapter in read[1:]:
            loaded.model.set_adapter(adapter.name)
            task_files.append(stage_task(root, out, contract, staging, adapter.name, contract.base_digest)[0])
        loaded.model.set_adapter(read[0].name)
        staging.publish()
    result = ExportResult(out, *task_file_paths(out, task.name), contract, verification, time.perf_counter() - start)
    return PeftExportResult(result, tuple(task_files), loaded.notes)


def _move_to_data(template: Path, names: list[str]) -> None:
    """Store the λ initializers of a saved template in its ``.data`` file, as ONNX Runtime's
    ``add_external_initializers`` requires of what it replaces (small ones were saved inline)."""
    import onnx
    from onnx import external_data_helper

    proto = onnx.load(str(template), load_external_data=False)
    data = Path(f"{template}.data")
    with open(data, "ab") as handle:
        for tensor in proto.graph.initializer:
            if tensor.name in names and tensor.HasField("raw_data"):
                offset, raw = handle.tell(), tensor.raw_data
                handle.write(raw)
                external_data_helper.set_external_data(tensor, data.name, offset, len(raw))
                tensor.ClearField("raw_data")
    onnx.save(proto, str(template))


def _finish(ir_model: ir.Model, root: nn.Module, contract: Contract, label: str) -> None:
    name_dims(ir_model, _head_dim(root.config))
    set_contract(ir_model, contract, label)


def _hot_session(template: Path, tensors: dict[str, np.ndarray]):
    """A session of the hot template with one task's λ, built as the runtime builds it."""
    import onnxruntime as ort

    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)) for array in tensors.values()]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_external_initializers(list(tensors), values)
    session = ort.InferenceSession(str(template), options, providers=["CPUExecutionProvider"])
    session.vera_values = values  # ORT does not own external initializers: keep them as long as the session
    return session


def _verify(graph: Path, peft_model: nn.Module, root: nn.Module, contract: Contract, names: list[str],
            tolerance: float, template: Path | None) -> Verification:
    """Each task and a task per row against PEFT (``tolerance``); a task per row against each task alone,
    and each task's hot session (``template``) against the graph, to rounding (``DEFAULT_TOLERANCE``)."""
    def use_task(name: str) -> None:
        peft_model.set_adapter(name)

    feeds = {}
    for name in names:
        use_task(name)
        tensors = current_task(find_vera_layers(root, name), contract).tensors
        feeds[name] = {key: value[None] for key, value in tensors.items()}
    session = ort_session(graph)
    cache = (_cache_layout(root.config), contract.kv_shared_buffer)
    checks, rows = verify_fused(session, peft_model, cache, contract.input_highs["input_ids"], feeds, use_task)
    exact = [rows] if rows is not None else []
    if template is not None:  # each task folded into the hot template computes what the graph does
        exact += verify_hot(session, lambda name: _hot_session(template, feeds[name]), cache,
                            contract.input_highs["input_ids"], feeds)
    del session
    if exact:
        _require_pass(Verification(tuple(exact), DEFAULT_TOLERANCE))
    _require_pass(Verification(tuple(checks), tolerance))
    return Verification((*checks, *exact), tolerance)
