"""Metrics: Pass@k (ALGORITHMS.md section 10) and the run logger (TensorBoard, JSONL, console).

Only process 0 writes; other processes get a logger that drops everything, so multi-host
runs log once.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Iterable, Mapping

import numpy as np


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased Pass@k = 1 - C(n - c, k) / C(n, k) from n samples with c correct (Chen et al.).

    Computed as a product, 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the
    huge binomials.
    """
    n, c = num_samples, num_correct
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_counts(correct, n: int, ks) -> np.ndarray:
    """`pass_at_k` for arrays of correct counts c (of n samples each) and several k at once.

    correct: integer counts, any shape; returns [..., len(ks)] float64.
    C(n-c, k) / C(n, k) = prod_{i<k} (n - c - i) / (n - i), which is 0 once i reaches n - c.
    """
    ks = [int(k) for k in ks]
    if min(ks) < 1 or max(ks) > n:
        raise ValueError(f"k={ks} must lie in [1, n={n}]")
    c = np.asarray(correct, np.float64)[..., None]
    i = np.arange(max(ks), dtype=np.float64)
    none = np.cumprod(np.clip(n - c - i, 0.0, None) / (n - i), axis=-1)
    return 1.0 - none[..., np.asarray(ks) - 1]


def pass_at_k_table(correct: np.ndarray, ks: Iterable[int] | None = None) -> dict[str, float]:
    """Mean Pass@k over prompts from a [num_prompts, n] 0/1 array; k = 1, 2, 4, ... up to n."""
    correct = np.asarray(correct, bool)
    n = correct.shape[1]
    ks = list(ks) if ks is not None else [2**i for i in range(int(math.log2(n)) + 1)]
    counts = correct.sum(axis=1)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in ks}


def _scalar(value):
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _tb_tag(key: str) -> str:
    """TensorBoard tags allow [A-Za-z0-9_./-]: pass@4 -> pass_at_4."""
    return re.sub(r"[^\w./-]", "_", key.replace("@", "_at_"))


# The console line shows these, in this order, when present.
CONSOLE_KEYS = (("reward", "reward"), ("entropy", "entropy"), ("pass@1", "pass@1"),
                ("tokens_per_s", "tok/s"), ("loss", "loss"), ("response_length", "len"))


class RunLogger:
    """Writes scalars to TensorBoard (tensorboardX), a JSONL copy, and one console line a step."""

    def __init__(self, workdir: str | None, *, enabled: bool = True, console=sys.stdout):
        self.enabled = enabled and workdir is not None
        self.console = console if enabled else None
        self.tb_dir = os.path.join(workdir, "tensorboard") if workdir else None
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl") if workdir else None
        self._writer = None
        self._jsonl = None
        self._start = time.time()
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._writer = SummaryWriter(self.tb_dir, flush_secs=10)
            self._jsonl = open(self.jsonl_path, "a")

    def scalars(self, step: int, values: Mapping[str, object], *, prefix: str = "") -> dict:
        """Logs every finite scalar; returns the dict written."""
        row = {}
        for key, value in values.items():
            v = _scalar(value)
            if v is not None:
                row[prefix + key] = v
        if self.enabled:
            for key, v in row.items():
                self._writer.add_scalar(_tb_tag(key), v, step)
            self._jsonl.write(json.dumps({"step": step, "time": round(time.time() - self._start, 3),
                                          **row}) + "\n")
            self._jsonl.flush()
        return row

    def progress(self, step: int, total: int, values: Mapping[str, object]) -> None:
        """One console line: step, the CONSOLE_KEYS present, elapsed time."""
        if self.console is None:
            return
        parts = [f"step {step}/{total}"]
        for key, label in CONSOLE_KEYS:
            v = _scalar(values.get(key))
            if v is not None:
                parts.append(f"{label} {v:.4g}" if key != "tokens_per_s" else f"{label} {v:.0f}")
        parts.append(f"{time.time() - self._start:.0f}s")
        print(" | ".join(parts), file=self.console, flush=True)

    def text(self, message: str) -> None:
        if self.console is not None:
            print(message, file=self.console, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()
