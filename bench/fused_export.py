"""The fused export's time and memory on a larger decoder: python bench/fused_export.py

bench/large_export.py's ~700M-parameter Llama (random weights, 2.8 GB of float32) and one VeRA adapter
(r=256 on q_proj and v_proj), a word-level tokenizer added for the builder. Each in a fresh interpreter,
one after the other: onnxruntime-genai 0.18.0's builder alone (`-p fp32|int4 -e cpu`, in .venv-genai),
then `export_fused` of the same base and adapter (builder included, verification on). Reports wall times,
their ratio, and the export's peak memory (its own VmHWM; the builder it starts is its child) against the
weight bytes. Writes bench/results/fused_export.md.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from fused import _PEAK, _in_child  # noqa: E402
from generate import GENAI_PYTHON  # noqa: E402
from large_export import CONFIG, WORK, _build  # noqa: E402


def _builder(base: Path, precision: str) -> float:
    out = WORK / f"builder-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([str(GENAI_PYTHON), "-m", "onnxruntime_genai.models.builder", "-i", str(base), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(WORK / "cache")], capture_output=True, check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def _ours(base: Path, adapter: Path, precision: str) -> tuple[float, int]:
    out = WORK / f"fused-{precision}" / "model.onnx"
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    seconds, peak, _ = _in_child(
        "from vera_export import export_fused;"
        f" export_fused({{'task': {str(adapter)!r}}}, {str(out)!r}, base={str(base)!r}, precision={precision!r},"
        f" builder={str(GENAI_PYTHON)!r}); " + _PEAK)
    shutil.rmtree(out.parent)
    return seconds, peak


def main() -> None:
    from peft_folders import add_tokenizer

    base, adapter = _build()
    if not (base / "tokenizer.json").is_file():
        add_tokenizer(base, CONFIG["vocab_size"])
    weights = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    rows = []
    for precision in ("fp32", "int4"):
        builder = _builder(base, precision)
        seconds, peak = _ours(base, adapter, precision)
        rows.append(f"| {precision} | {builder:.1f} s | {seconds:.1f} s | {seconds / builder:.2f}× |"
                    f" {peak / 1e9:.2f} GB | {peak / weights:.2f}× |")
    lines = [
        "# Fused export on a 700M Llama (issue 18)", "",
        f"`python bench/fused_export.py` on {platform.processor() or platform.machine()}: a {weights / 1e9:.2f} GB"
        " float32 Llama (random weights), one VeRA adapter (r=256 on q_proj/v_proj); each command in a fresh"
        " interpreter, imports included; ours builds with the same builder and verifies against PEFT.", "",
        "| precision | builder alone | ours (`export_fused`) | ours / builder | our peak memory | peak / weights |",
        "| --- | --- | --- | --- | --- | --- |", *rows, "",
    ]
    (HERE / "results" / "fused_export.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
