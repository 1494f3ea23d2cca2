"""``python -m vera_models ARCH --out-dir DIR --task NAME=SEED ...``: write reference checkpoints.

One checkpoint per task, all over the same base weights and the same A/B (so they share one
graph), each with its own λ vectors: what fine-tuning one base model on several tasks gives.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from vera_export import save_checkpoint

from . import ARCHITECTURES, build, build_base, example_input, make_task


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("architecture", type=click.Choice(sorted(ARCHITECTURES)))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--task-seed", "tasks", multiple=True, default=["default=1"], show_default=True, metavar="NAME=SEED",
              help="A task and the seed of its stand-in λ vectors; repeat for more tasks.")
@click.option("--task", "legacy_tasks", multiple=True, hidden=True)  # the name before --task-seed
@click.option("--seed", default=0, show_default=True, help="Seed of the base weights.")
def main(architecture: str, out_dir: Path, tasks: tuple[str, ...], legacy_tasks: tuple[str, ...], seed: int) -> None:
    """Write one vera-export checkpoint of ARCHITECTURE per task, and an example input (input.npz)."""
    tasks = legacy_tasks or tasks
    out_dir.mkdir(parents=True, exist_ok=True)
    example = example_input(build_base(architecture, seed=seed))
    np.savez(out_dir / "input.npz", **example)
    click.echo(f"Wrote {out_dir / 'input.npz'} ({', '.join(example)})")
    for entry in tasks:
        name, _, task_seed = entry.partition("=")
        if not task_seed.isdigit():
            raise click.BadParameter(f"{entry!r}: expected NAME=SEED, e.g. sentiment=1", param_hint="--task-seed")
        model = make_task(build(architecture, seed=seed), int(task_seed))
        path = save_checkpoint(model, out_dir / f"{architecture}.{name}.pt", task_name=name)
        click.echo(f"Wrote {path}")


main()
