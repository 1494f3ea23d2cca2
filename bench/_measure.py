"""Timing and memory helpers: medians with min/max, RSS from a clean subprocess."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Timing:
    median: float
    low: float
    high: float

    def ms(self) -> str:
        return f"{self.median * 1e3:.2f} ({self.low * 1e3:.2f}–{self.high * 1e3:.2f})"

    def us(self) -> str:
        return f"{self.median * 1e6:.1f} ({self.low * 1e6:.1f}–{self.high * 1e6:.1f})"


def timed(fn: Callable[[], object], repeats: int, warmup: int = 3, inner: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return Timing(statistics.median(samples), min(samples), max(samples))


def rss_in_subprocess(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it must print one JSON object (e.g. RSS readings)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])
