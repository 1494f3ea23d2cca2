"""A > 2 GB decoder through --kv-cache: python bench/large_export.py

Builds a ~700M-parameter Llama (random weights, 2.8 GB of float32) and one VeRA adapter (r=256 on
q_proj and v_proj) as PEFT folders, exports them with `vera-export … --kv-cache` in a child process,
and reports the files written (ONNX external data beside the graph), the export's wall time and
its peak memory (the child's max RSS) against the model's weight bytes. Then greedy tokens of
VeraSession.generate on the exported graph against PEFT generate. Appends to bench/results/generate.md.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "results" / "work" / "large"
CONFIG = dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
              num_key_value_heads=4, max_position_embeddings=2048)


def _build() -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import VeraConfig, get_peft_model

    base, adapter = WORK / "base", WORK / "adapter"
    if not base.is_dir():
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(base)
    if not adapter.is_dir():
        model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                               VeraConfig(r=256, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in (p for p in model.parameters() if p.requires_grad):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        model.save_pretrained(adapter)
    return base, adapter


def _export(base: Path, adapter: Path) -> tuple[Path, float, int]:
    out = WORK / "out" / "model.onnx"
    out.parent.mkdir(exist_ok=True)
    exporter = Path(sys.executable).with_name("vera-export")
    start = time.perf_counter()
    subprocess.run([str(exporter), str(adapter), "--base", str(base), "--kv-cache", "--out", str(out)], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return out, seconds, peak


def _parity(out: Path, base: Path, adapter: Path) -> tuple[list[int], list[int]]:
    import torch
    import transformers
    from peft import PeftModel

    from vera_runtime import VeraSession

    ids = np.array([[5, 17, 300, 42, 7, 99, 1000, 3]])
    session = VeraSession(out, device="cpu")
    ours = session.generate(ids, max_new_tokens=8, eos_token_id=[])[0].tolist()
    del session
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), adapter).eval()
    model.get_base_model().generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=8, do_sample=False).numpy()[0].tolist()
    return ours, theirs


def main() -> None:
    base, adapter = _build()
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    out, seconds, peak = _export(base, adapter)
    files = {p.name: p.stat().st_size for p in sorted(out.parent.iterdir())}
    ours, theirs = _parity(out, base, adapter)
    lines = [
        "", "## A > 2 GB decoder (`python bench/large_export.py`)", "",
        f"Llama {json.dumps(CONFIG)}: {weights / 1e9:.2f} GB of float32 weights (safetensors), one VeRA adapter"
        " (r=256, q_proj and v_proj).", "",
        f"- `vera-export … --kv-cache`: {seconds:.0f} s; peak memory (max RSS) {peak / 1e9:.2f} GB ="
        f" {peak / weights:.2f}× the weight bytes (target ≤ 2.5×).",
        "- Files: " + ", ".join(f"`{name}` {size / 1e6:,.1f} MB" for name, size in files.items()) + ".",
        f"- Greedy, 8 new tokens: VeraSession.generate {'equals' if ours == theirs else 'DIFFERS FROM'} PEFT generate"
        f" ({ours[-8:]}).", "",
    ]
    with (HERE / "results" / "generate.md").open("a") as results:
        results.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
