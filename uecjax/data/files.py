"""Finding a split's files (Hugging Face layouts, globs) and reading their rows.

A data path may be a file (`.parquet`, `.jsonl`, `.json`), a glob (`/d/data/train-*.parquet`,
`{split}` is replaced by the split name), or a directory laid out as on the Hugging Face hub:
`data/<split>-00000-of-00001.parquet`, or `<split>-*.parquet`, `<split>.jsonl`, `<split>/*.parquet`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

EXTENSIONS = (".parquet", ".jsonl", ".json")
# Tried in order inside a directory; the first pattern with matches wins.
SPLIT_PATTERNS = ("data/{split}-*{ext}", "data/{split}{ext}", "{split}-*{ext}", "{split}{ext}",
                  "{split}/*{ext}")


class DataNotFoundError(FileNotFoundError):
    """A data path, or a split inside it, does not exist. The message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DownloadHint:
    """How to get a dataset that is missing: the Hugging Face repository to download."""

    name: str  # human name, e.g. "Geometry3K"
    hf_repo: str  # e.g. "hiyouga/geometry3k"

    def message(self, local_dir: str | os.PathLike) -> str:
        return (f"Download {self.name} (on any machine with internet access) with\n"
                f"  hf download {self.hf_repo} --repo-type dataset --local-dir {local_dir}\n"
                f"(huggingface_hub < 1.0: `huggingface-cli download` with the same arguments), "
                f"then point the data path at that directory.")


GENERIC_HELP = ("Point the data path at a .parquet/.jsonl file, a glob, or a directory laid out "
                "as on the Hugging Face hub (data/<split>-*.parquet).")


def _help(hint: DownloadHint | None, path: str | os.PathLike) -> str:
    return hint.message(path) if hint else GENERIC_HELP


def resolve_files(path: str | os.PathLike, split: str | None = None, *,
                  hint: DownloadHint | None = None) -> list[Path]:
    """The data files of `split` under `path` (file, glob or directory), sorted.

    Raises DataNotFoundError naming what is missing, what was looked for, and how to get it.
    """
    text = str(path)
    if split is not None:
        text = text.replace("{split}", split)
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text) if p.endswith(EXTENSIONS))
        if not files:
            raise DataNotFoundError(f"no data files match {text!r}.\n{_help(hint, '<dir>')}")
        return files
    p = Path(text).expanduser()
    if p.is_file():
        if not text.endswith(EXTENSIONS):
            raise ValueError(f"{p}: unsupported data file type; expected one of {EXTENSIONS}")
        return [p]
    if not p.exists():
        raise DataNotFoundError(f"data path not found: {p} does not exist.\n{_help(hint, p)}")
    if split is None:
        raise ValueError(f"{p} is a directory: name the split to read (e.g. split='train')")
    tried = []
    for pattern in SPLIT_PATTERNS:
        for ext in EXTENSIONS:
            rel = pattern.format(split=split, ext=ext)
            tried.append(rel)
            files = sorted(f for f in p.glob(rel) if f.is_file())
            if files:
                return files
    found = available_splits(p)
    raise DataNotFoundError(
        f"no files for split {split!r} under {p}: looked for {', '.join(tried[:4])}, ... "
        f"Splits found there: {', '.join(found) if found else 'none'}.\n{_help(hint, p)}")


def available_splits(directory: Path) -> list[str]:
    """Split names suggested by the directory's data files (`train-00000-of-00001.parquet`)."""
    names = set()
    for f in list(directory.glob("*")) + list(directory.glob("data/*")):
        if f.name.endswith(EXTENSIONS):
            names.add(re.split(r"[-.]", f.name, maxsplit=1)[0])
    return sorted(names)


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: cannot read the parquet file ({e}); it may be truncated, "
                         "download it again") from e


def iter_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(row label, row dict) for each row of a parquet or JSON-lines file, in order.

    A JSON line that does not parse yields (label, ValueError) so the caller counts it. Labels
    are `row N` (0-based) for parquet and `line N` (1-based) for JSON lines.
    """
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, columns)
    else:
        yield from _json_rows(path)


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256, columns=columns)
        row = 0
        for batch in batches:
            for item in batch.to_pylist():
                yield f"row {row}", item
                row += 1
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path}: cannot read the parquet file ({e}); it may be truncated, "
                         "download it again") from e


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    # Bytes, decoded line by line: a line that is not UTF-8 is one malformed row, not the file.
    with open(path, "rb") as f:
        head = f.read(1 << 12).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # a .json file holding one array of rows
            for i, item in enumerate(json.loads(f.read().decode("utf-8"))):
                yield f"item {i}", item
            return
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"line {lineno}", ValueError(f"invalid UTF-8: {e}")
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except ValueError as e:
                yield f"line {lineno}", ValueError(f"invalid JSON: {e}")
