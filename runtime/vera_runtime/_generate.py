"""Generation with a KV-cache graph (``vera-export … --kv-cache``): prefill the prompt once, then one
token per step, each step's ``present`` fed back as the next ``past``. Greedy follows transformers'
``generate`` token for token: left padding, position ids from the mask, finished rows padded."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ._errors import FeedError
from ._feeds import InputInfo
from ._json import load_file_bounded

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
GENAI_CONFIG = "genai_config.json"


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The cache inputs and outputs of a graph, pairwise: ``past[i]`` takes what ``present[i]`` gave."""

    past: tuple[str, ...]
    present: tuple[str, ...]
    kv_heads: int
    head_dim: int
    # False for the fused graph (`vera-export --fused`, onnxruntime-genai's builder): GroupQueryAttention
    # takes each row's positions from its mask, the row's tokens first (padding on the right)
    position_ids: bool = True

    @classmethod
    def of_layers(cls, layers: int, kv_heads: int, head_dim: int) -> CacheLayout:
        names = [(i, kind) for i in range(layers) for kind in ("key", "value")]
        return cls(tuple(PAST.format(*n) for n in names), tuple(PRESENT.format(*n) for n in names), kv_heads, head_dim)

    @classmethod
    def of(cls, inputs: dict[str, InputInfo], outputs: Sequence[str]) -> CacheLayout | None:
        """The layout of a graph's inputs and outputs, or None for a graph without a cache."""
        layers = 0
        while PAST.format(layers, "key") in inputs:
            layers += 1
        if not layers:
            return None
        _, kv_heads, _, head_dim = inputs[PAST.format(0, "key")].shape
        layout = cls.of_layers(layers, int(kv_heads), int(head_dim))
        if any(name not in inputs for name in layout.past) or any(name not in outputs for name in layout.present):
            return None
        return dataclasses.replace(layout, position_ids="position_ids" in inputs)

    @property
    def layers(self) -> int:
        return len(self.past) // 2

    def empty(self, batch: int) -> dict[str, np.ndarray]:
        return {name: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for name in self.past}

    def shared_step(self, session, task_feeds: dict, batch: int, capacity: int):
        """``cache_step`` for a graph whose past and present share one buffer (``vera.kv_shared_buffer``,
        GroupQueryAttention): one ``[batch, kv_heads, capacity, head_dim]`` buffer per name, bound as both
        past and present, so a step writes its new positions in place and copies nothing that grows."""
        import onnxruntime as ort

        def value(array):
            if isinstance(array, ort.OrtValue):
                return array
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))

        shape = (batch, self.kv_heads, capacity, self.head_dim)
        buffers = [value(np.zeros(shape, np.float32)) for _ in self.past]
        tasks = {name: value(array) for name, array in task_feeds.items()}  # bound once, reused each step

        binding = session.io_binding()  # one binding for the whole generation: only ids and mask change
        for name, bound in tasks.items():
            binding.bind_ortvalue_input(name, bound)
        for past_name, present_name, buffer in zip(self.past, self.present, buffers, strict=True):
            binding.bind_ortvalue_input(past_name, buffer)
            binding.bind_ortvalue_output(present_name, buffer)

        def step(feeds, past):
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            binding.bind_output("logits", "cpu")  # a new array each step (its sequence length changes)
            session.run_with_iobinding(binding)
            return binding.get_outputs()[-1].numpy(), past

        return step


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Special tokens as the export's ``genai_config.json`` records them."""

    eos: tuple[int, ...] = ()
    pad: int = 0

    @classmethod
    def beside(cls, graph: Path) -> TokenIds:
        """From the ``genai_config.json`` in the graph's folder (the export's, which its converted forms
        share: onnxruntime-genai keeps one model per folder), else none."""
        try:
            model = load_file_bounded(graph.with_name(GENAI_CONFIG))["model"]
            eos, pad = model.get("eos_token_id"), model.get("pad_token_id")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls()
        eos = tuple(e for e in eos if isinstance(e, int)) if isinstance(eos, list) else (
            (eos,) if isinstance(eos, int) else ())
        return cls(eos, pad if isinstance(pad, int) else (eos[0] if eos else 0))

    def overridden(self, eos: int | Sequence[int] | None, pad: int | None) -> TokenIds:
        """These ids, with the caller's ``eos`` (one id or several; ``[]``: none) and ``pad`` where given."""
        if eos is not None:
            eos = tuple(eos) if isinstance(eos, Sequence) else (eos,)
        return TokenIds(self.eos if eos is None else tuple(int(e) for e in eos), self.pad if pad is None else int(pad))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: argmax, or a draw after temperature, top-k and top-p."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise FeedError(f"temperature must be > 0, got {self.temperature!r}; use do_sample=False for greedy.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise FeedError(f"top_k must be a positive integer or None, got {self.top_k!r}.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise FeedError(f"top_p must be in (0, 1] or None, got {self.top_p!r}.")

    def chooser(self):
        if not self.do_sample:
            return lambda logits: logits.argmax(-1)
        rng = np.random.default_rng(self.seed)
        return lambda logits: np.array([rng.choice(len(p), p=p) for p in self._probabilities(logits)])

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        """transformers' order: temperature, then top-k, then top-p (the smallest set over top_p)."""
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = np.partition(scores, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            ranked = np.take_along_axis(probs, order, -1)
            drop = np.zeros(probs.shape, dtype=bool)  # a token goes when the tokens above it reach top_p
            np.put_along_axis(drop, order, np.cumsum(ranked, -1) - ranked >= self.top_p, -1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(-1, keepdims=True)
        return probs


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers' ``generate`` derives them from a left-padded mask."""
    return np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1).astype(np.int64)


def check_length(ids: np.ndarray, max_new_tokens, limit: int | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise FeedError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise FeedError(
            f"a prompt of {ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} exceeds the model's {limit}"
            " positions: shorten the prompt or lower max_new_tokens."
        )


def cache_step(session, layout: CacheLayout, task_feeds: dict, on_device: bool):
    """One forward with the cache: ``(feeds, past) -> (logits [batch, new, vocab], present by past name)``.
    ``on_device`` (CUDA): the cache stays on the GPU between steps (IOBinding); only logits come back."""
    names = ["logits", *layout.present]

    def on_cpu(feeds, past):
        logits, *present = session.run(names, {**feeds, **past, **task_feeds})
        return logits, dict(zip(layout.past, present, strict=True))

    def on_cuda(feeds, past):
        import onnxruntime as ort

        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in past.items():  # numpy only for the first step's empty cache
            (binding.bind_ortvalue_input if isinstance(value, ort.OrtValue) else binding.bind_cpu_input)(name, value)
        for name, value in task_feeds.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in layout.present:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), dict(zip(layout.past, present, strict=True))

    return on_cuda if on_device else on_cpu


def check_prompt(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``[batch, prompt]`` ids and a 0/1 mask of the same shape, padded on the left."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise FeedError(
            f"input_ids must be integer token ids of shape [batch, prompt], got {ids.dtype.name}{list(ids.shape)}."
        )
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
        raise FeedError(f"attention_mask must be 0/1 of the prompt's shape {list(ids.shape)}, got {list(mask.shape)}.")
    if (mask.sum(-1) == 0).any():
        raise FeedError(f"prompt row {int(np.argmin(mask.sum(-1)))} has no tokens (its mask is all 0).")
    if (np.diff(mask, axis=-1) < 0).any():
        row = int(np.argmax((np.diff(mask, axis=-1) < 0).any(-1)))
        raise FeedError(
            f"prompt row {row} is padded on the right: generation appends after the last column, so pad on the"
            " left (tokenizer.padding_side = 'left')."
        )
    return ids.astype(np.int64), mask.astype(np.int64)


def stream(step, layout: CacheLayout, ids: np.ndarray, mask: np.ndarray, max_new_tokens: int, sampling: Sampling,
           tokens: TokenIds, prefill_all: bool = True) -> Iterator[np.ndarray]:
    """Yield the next token of every row, ``[batch]``, up to ``max_new_tokens`` times; rows that
    produced an eos token get ``tokens.pad`` after it, and the stream ends when every row has.
    ``step(feeds, past) -> (logits [batch, new, vocab], present by past name)``."""
    choose = sampling.chooser()
    past = layout.empty(len(ids))
    running = np.ones(len(ids), dtype=bool)
    if not layout.position_ids:
        yield from _stream_tokens_first(step, past, running, ids, mask, max_new_tokens, choose, tokens, prefill_all)
        return
    feed_ids, position_ids = ids, positions(mask)
    for _ in range(max_new_tokens):
        feeds = {"input_ids": feed_ids, "attention_mask": mask, "position_ids": position_ids}
        logits, past = step(feeds, past)
        chosen = np.where(running, choose(logits[:, -1]), tokens.pad).astype(np.int64)
        running &= ~np.isin(chosen, tokens.eos)
        yield chosen
        if not running.any():
            return
        feed_ids = chosen[:, None]
        mask = np.concatenate([mask, np.ones_like(feed_ids)], axis=1)
        position_ids = position_ids[:, -1:] + 1  # every row ends in a real token: the next one follows it


def _stream_tokens_first(step, past, running, ids, mask, max_new_tokens, choose, tokens,
                         prefill_all: bool) -> Iterator[np.ndarray]:
    """``stream`` for graphs without position ids (GroupQueryAttention): each row's tokens come first and
    its mask counts them, so each new token lands right after its own row's last one.

    ``prefill_all=False`` (graphs with sliding-window caches, which refuse a padded prefill): the prefill
    takes the shortest prompt's length from every row, and longer prompts are fed a token per step while
    the shorter rows already generate; each row's tokens are yielded in step with the others."""
    lengths, rows = mask.sum(-1), np.arange(len(ids))
    prompts = np.stack([np.roll(row, n) for row, n in zip(ids, lengths, strict=True)])  # left padding to right
    width = int(lengths.max() if prefill_all else lengths.min())
    fed, feed_ids, last = np.minimum(lengths, width), prompts[:, :width], np.minimum(lengths, width) - 1
    made: list[list[int]] = [[] for _ in rows]
    for yielded in range(max_new_tokens):
        while any(len(tokens_of_row) <= yielded for tokens_of_row in made):
            feeds = {"input_ids": feed_ids, "attention_mask": (np.arange(width) < fed[:, None]).astype(np.int64)}
            logits, past = step(feeds, past)
            chosen = choose(logits[rows, last])
            for row in rows[fed >= lengths]:  # rows past their prompt generated a token
                made[row].append(int(chosen[row]) if running[row] else tokens.pad)
                running[row] &= made[row][-1] not in tokens.eos
            next_ids = [prompts[row, fed[row]] if fed[row] < lengths[row] else made[row][-1] for row in rows]
            feed_ids, fed, width, last = np.array(next_ids, np.int64)[:, None], fed + 1, width + 1, np.zeros_like(last)
        yield np.array([tokens_of_row[yielded] for tokens_of_row in made], np.int64)
        if not running.any():
            return
