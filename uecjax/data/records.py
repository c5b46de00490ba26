"""The record every source yields, and the counter of rows that were skipped."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Mapping

logger = logging.getLogger("uecjax.data")


@dataclasses.dataclass(frozen=True)
class Record:
    """One problem, whatever file it came from.

    `prompt` is the problem text only (for Geometry3K with its `<image>` placeholders); the chat
    template and the answer-format instruction are added when prompts are built. `images` are
    encoded bytes as read, or RGB `PIL.Image`s after `decode_images`. `choices` are the
    multiple-choice options (empty if none); the reward accepts their letters. `meta` holds
    source-specific extras (Geometry3K's ground-truth letter, the demo task's level).
    """

    prompt: str
    answer: str
    images: tuple = ()
    choices: tuple[str, ...] = ()
    id: str = ""
    source: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class SkipCounter:
    """Counts malformed rows that were skipped, by reason and by file; thread-safe.

    The first `max_warnings_per_file` skips of each file are logged one by one (file, row,
    reason); later ones only counted, with a summary from `log_summary`. `as_dict()` gives
    flat metrics for the logger: {"skipped": total, "skipped/<reason>": n, ...}.
    """

    def __init__(self, max_warnings_per_file: int = 10):
        self.max_warnings_per_file = max_warnings_per_file
        self.by_reason: collections.Counter[str] = collections.Counter()
        self.by_file: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def skip(self, file: str, row: int | str, reason: str, detail: str = "") -> None:
        """Record that `row` of `file` was skipped because of `reason` (a short identifier)."""
        with self._lock:
            self.by_reason[reason] += 1
            self.by_file[file] += 1
            n = self.by_file[file]
        if n <= self.max_warnings_per_file:
            logger.warning("skipping malformed row: %s, %s: %s%s", file, row, reason,
                           f" ({detail})" if detail else "")
            if n == self.max_warnings_per_file:
                logger.warning("%s: further malformed rows are counted but not logged", file)

    def log_summary(self) -> None:
        if self.total:
            logger.warning("skipped %d malformed rows: %s; by file: %s", self.total,
                           dict(self.by_reason), dict(self.by_file))

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {"skipped": sum(self.by_reason.values()),
                    **{f"skipped/{k}": v for k, v in sorted(self.by_reason.items())}}

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
