"""The graph contract, checked on every exported model: ours and PEFT's (Linear and Conv1D)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch

from helpers import (
    TOLERANCE,
    as_feeds,
    inputs_for,
    max_relative_diff,
    random_task,
    run,
    session,
    task_of,
    torch_reference,
)
from vera_runtime import Contract, read_onnx_adapter, read_task
from vera_runtime._taskfile import adapter_model_version


def test_two_lambda_sets_fed_as_inputs_match_pytorch(exported):
    sess = session(exported.path)
    feeds = inputs_for(exported, batch=3, seq=11)
    numpy_feeds = {k: v.numpy() for k, v in feeds.items()}
    outputs = []
    for seed in (11, 12):
        task = random_task(exported.adapted, seed)
        got = run(sess, {**numpy_feeds, **as_feeds(task)})
        want = torch_reference(exported, feeds, task)
        assert max_relative_diff(got, want) <= TOLERANCE
        outputs.append(got)
    first_output = next(iter(outputs[0]))
    assert not np.allclose(outputs[0][first_output], outputs[1][first_output], atol=1e-3), "tasks must differ"


def test_no_lambda_fed_runs_the_exported_task(exported):
    sess = session(exported.path)
    feeds = inputs_for(exported, batch=2, seq=5, seed=1)
    got = run(sess, {k: v.numpy() for k, v in feeds.items()})
    assert max_relative_diff(got, torch_reference(exported, feeds)) <= TOLERANCE


def test_mixed_batch_rows_equal_their_single_task_runs(exported):
    sess = session(exported.path)
    batch = 4
    feeds = {k: v.numpy() for k, v in inputs_for(exported, batch=batch, seq=6, seed=2).items()}
    tasks = [task_of(exported.adapted)] + [random_task(exported.adapted, seed) for seed in (21, 22, 23)]
    mixed = {name: np.stack([t[name].numpy() for t in tasks]) for name in tasks[0]}
    got = run(sess, {**feeds, **mixed})
    for row, task in enumerate(tasks):
        single = run(sess, {**feeds, **as_feeds(task)})
        for name in got:
            np.testing.assert_allclose(got[name][row], single[name][row], rtol=0, atol=1e-5)


def test_ort_adapter_api_equals_feeding_the_same_lambdas(exported):
    sess = session(exported.path)
    feeds = {k: v.numpy() for k, v in inputs_for(exported, batch=2, seq=7, seed=3).items()}
    adapter = ort.LoraAdapter()
    adapter.Load(str(exported.result.adapter_path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    task = read_task(exported.result.task_path).tensors
    with_adapter = run(sess, feeds, options)
    fed = run(sess, {**feeds, **{k: v[None] for k, v in task.items()}})
    for name in fed:
        np.testing.assert_array_equal(with_adapter[name], fed[name])
    # and the adapter really is active: another task fed directly gives other outputs
    other = run(sess, {**feeds, **as_feeds(random_task(exported.adapted, 5))})
    assert any(not np.allclose(other[n], fed[n]) for n in fed)


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def test_projections_stored_once_and_file_within_one_percent(exported):
    graph = onnx.load(str(exported.path))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    vera_a = exported.adapted.vera_a.numpy()
    vera_b = exported.adapted.vera_b.numpy()
    np.testing.assert_array_equal(initializers["vera_A"], vera_a)
    np.testing.assert_array_equal(initializers["vera_B"], vera_b)
    # no other initializer is A, B, or a slice/transpose of either
    for name, array in initializers.items():
        if name in ("vera_A", "vera_B"):
            continue
        for projection in (vera_a, vera_b, vera_a.T, vera_b.T):
            if array.ndim == 2 and array.shape[0] <= projection.shape[0] and array.shape[1] <= projection.shape[1]:
                assert not np.array_equal(array, projection[: array.shape[0], : array.shape[1]]), name
    state = exported.model.state_dict(keep_vars=True)
    base = [t for n, t in state.items() if "vera_" not in n]
    budget = (_unique_bytes(base) + vera_a.nbytes + vera_b.nbytes) * 1.01
    assert os.path.getsize(exported.path) <= budget


def test_metadata_carries_the_contract(exported):
    graph = onnx.load(str(exported.path), load_external_data=False)
    metadata = {p.key: p.value for p in graph.metadata_props}
    contract = Contract.from_metadata(metadata)
    adapted = exported.adapted
    assert contract.version == "1"
    assert contract.r == adapted.r == adapted.vera_a.shape[0]
    assert contract.seed == adapted.seed
    assert contract.recipe.startswith("peft-vera-v1")
    assert [(layer.name, layer.in_features, layer.out_features) for layer in contract.layers] == [
        (layer.name, layer.in_features, layer.out_features) for layer in adapted.layers
    ]
    assert json.loads(metadata["vera.layers"])[0]["name"] == adapted.layers[0].name
    assert contract.default_task == exported.result.contract.default_task
    assert read_task(exported.result.task_path).fingerprint == contract.fingerprint
    version, _ = read_onnx_adapter(exported.result.adapter_path)
    assert version == adapter_model_version(contract.fingerprint)


def test_inputs_are_symbolic_and_lambdas_are_task_inputs_with_defaults(exported):
    sess = session(exported.path)
    contract = exported.result.contract
    model_inputs = {i.name: i.shape for i in sess.get_inputs()}
    assert set(model_inputs) == {s.name for s in exported.specs}
    for shape in model_inputs.values():
        assert shape == ["batch", "sequence"]
    defaults = {i.name: i.shape for i in sess.get_overridable_initializers()}
    for layer in contract.layers:
        assert defaults[layer.lambda_d] == ["tasks", contract.r]
        assert defaults[layer.lambda_b] == ["tasks", layer.out_features]
    assert len(defaults) == 2 * len(contract.layers)


def test_peft_layer_names_map_one_to_one_onto_graph_inputs(bert):
    from peft.utils import get_peft_model_state_dict

    saved = get_peft_model_state_dict(bert.model)
    lambda_keys = {k for k in saved if "vera_lambda" in k}
    assert lambda_keys == set(bert.result.contract.task_shapes())
    assert "base_model.model.encoder.layer.0.attention.self.query.vera_lambda_d" in lambda_keys


def test_our_layers_match_peft_projection_init_and_forward():
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    import vera_models
    from vera_export import VeraConfig, apply_vera

    ours = vera_models.build_base("tiny-decoder", seed=5)
    theirs = vera_models.build_base("tiny-decoder", seed=5)
    targets = ["query", "value", "up", "down"]
    apply_vera(ours, VeraConfig(targets, r=32, projection_prng_key=9, d_initial=0.3))
    peft_config = PeftVeraConfig(r=32, target_modules=targets, projection_prng_key=9, d_initial=0.3)
    peft_model = get_peft_model(theirs, peft_config)
    assert torch.equal(ours.vera_projection.vera_A, peft_model.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projection.vera_B, peft_model.base_model.vera_B["default"])
    layer = ours.blocks[0].ffn.down
    peft_layer = peft_model.base_model.model.blocks[0].ffn.down
    assert torch.equal(layer.vera_lambda_d, peft_layer.vera_lambda_d["default"])
    assert torch.equal(layer.vera_lambda_b, peft_layer.vera_lambda_b["default"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
                peft_name = "base_model.model." + name + ".default"
                peft_model.get_parameter(peft_name).copy_(param)
        ids = torch.randint(0, 8192, (2, 9), generator=generator)
        torch.testing.assert_close(ours(ids)["logits"], peft_model(input_ids=ids)["logits"], rtol=0, atol=1e-5)


def test_small_and_large_one_task_batches_match_pytorch(exported):
    sess = session(exported.path)
    widest = max(max(layer.in_features, layer.out_features) for layer in exported.result.contract.layers)
    other = random_task(exported.adapted, seed=5)
    for batch, seq in ((2, 3), (widest // 4 + 1, 4)):  # more rows than any layer's width
        feeds = inputs_for(exported, batch=batch, seq=seq, seed=batch)
        got = run(sess, {k: v.numpy() for k, v in feeds.items()} | as_feeds(other))
        assert max_relative_diff(got, torch_reference(exported, feeds, other)) <= TOLERANCE


def test_export_plain_writes_a_model_without_vera_as_vera_export_does(tmp_path):
    """The reference graphs of the benchmarks: the base model (or a merged one) through the same pipeline."""
    import vera_models
    from vera_export import export_plain

    base = vera_models.build_base("tiny-encoder")
    inputs = vera_models.example_input(base)
    specs = ["input_ids:int64<8192:batch=2,sequence=8", "attention_mask:int64<2:batch=2,sequence=8"]
    path = export_plain(base, tmp_path / "base.onnx", specs)
    got = run(session(path), inputs)
    with torch.no_grad():
        want = base(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=0, atol=1e-5)
    assert not any("vera" in i.name for i in onnx.load(str(path)).graph.input)
