"""Text in and out for ``vera-run generate``: the tokenizer.json exported beside a KV-cache graph,
read with the ``tokenizers`` package (Rust, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._errors import FeedError


def load_tokenizer(graph: Path):
    path = graph.with_name("tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json beside {graph}: export from a base folder that has one, or copy the base model's"
            " tokenizer.json there."
        )
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise FeedError("text generation needs the tokenizers package: pip install tokenizers") from exc
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises its own exception type for a bad file
        raise FeedError(f"{path} is not a tokenizers tokenizer.json: {exc}") from exc


def encode_left_padded(tokenizer, prompts: list[str], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask ``[prompts, longest]``, shorter prompts padded on the left as generation needs."""
    encoded = [tokenizer.encode(prompt).ids for prompt in prompts]
    if not all(encoded):
        raise FeedError(f"prompt {next(i for i, e in enumerate(encoded) if not e)} encodes to no tokens.")
    width = max(map(len, encoded))
    ids = np.array([[pad] * (width - len(e)) + e for e in encoded], dtype=np.int64)
    mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=np.int64)
    return ids, mask
