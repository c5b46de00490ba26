r"""Sources of `Record`s from Hugging Face parquet and JSON-lines files, with configurable fields.

    source = geometry3k_source("/data/geometry3k", split="train")    # hiyouga/geometry3k
    source = math_source("/data/math", split="test")                  # problem/answer/solution
    source = load_source("/data/dapo.jsonl", fields=Fields(prompt="prompt",
                         answer="reward_model.ground_truth"))
    source.skipped.as_dict()  # {"skipped": 2, "skipped/bad_image": 1, ...} for the logger

All rows are read and checked once, when the source is built: a row with a missing or empty
prompt/answer, malformed choices, or an image that does not decode is skipped, counted in
`source.skipped` and logged with its file and row. Checking up front (rather than while
iterating) keeps the dataset length fixed, so shuffling, per-host sharding and iterator
checkpoints are exact, and every host and every resumed run sees the same counts.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from uecjax.data.files import DownloadHint, iter_rows, parquet_columns, resolve_files
from uecjax.data.records import Record, SkipCounter
from uecjax.rewards.grading import extract_boxed

IMAGE_PLACEHOLDER = "<image>"
GEOMETRY3K_HINT = DownloadHint("Geometry3K", "hiyouga/geometry3k")
MATH_HINT = DownloadHint("MATH", "DigitalLearningGmbH/MATH-lighteval")


@dataclasses.dataclass(frozen=True)
class Fields:
    """Which field of a row holds what. Dotted names reach into nested structs/objects
    (`reward_model.ground_truth`). None means the dataset has no such field."""

    prompt: str = "problem"  # a string, or a list of chat messages (the last user message)
    answer: str | None = "answer"
    # A worked solution whose last \boxed{} is the answer, used when `answer` is absent/empty.
    solution: str | None = None
    images: str | None = None  # list of {"bytes", "path"} structs, bytes, or file paths
    choices: str | None = None  # list of option texts
    id: str | None = None  # default id: "<file name>:<row label>"
    meta: tuple[str, ...] = ()  # extra fields copied into Record.meta when present

    def __post_init__(self):
        if self.answer is None and self.solution is None:
            raise ValueError("Fields: set `answer` or `solution` (or both); "
                             "a record needs a reference answer")


GEOMETRY3K_FIELDS = Fields(prompt="problem", answer="answer", images="images",
                           choices="choices", id="id", meta=("ground_truth",))
MATH_FIELDS = Fields(prompt="problem", answer="answer", solution="solution", id="unique_id",
                     meta=("level", "type", "subject"))


class RecordSource:
    """A random-access list of checked `Record`s (grain's `RandomAccessDataSource` protocol).

    `files` are the files read, `skipped` the counter of malformed rows.
    """

    def __init__(self, records: Sequence[Record], *, name: str, files: Sequence[Path] = (),
                 skipped: SkipCounter | None = None):
        self._records = list(records)
        self.name = name
        self.files = tuple(files)
        self.skipped = skipped if skipped is not None else SkipCounter()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self._records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)

    def __repr__(self) -> str:
        return (f"RecordSource({self.name!r}, {len(self)} records from {len(self.files)} files, "
                f"{self.skipped.total} skipped)")


class _Malformed(Exception):
    """A row that cannot become a Record: `reason` is a short identifier for the counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_MISSING = object()


def _get(row: Any, dotted: str | None) -> Any:
    if dotted is None:
        return _MISSING
    value = row
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _text(value: Any, field: str, name: str) -> str:
    """A non-empty string from a string or number field, else _Malformed."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is _MISSING or value is None:
        raise _Malformed(f"missing_{field}", f"field {name!r} is missing or null")
    if not isinstance(value, str):
        raise _Malformed(f"bad_{field}", f"field {name!r} is a {type(value).__name__}, "
                                         "expected a string")
    if not value.strip():
        raise _Malformed(f"missing_{field}", f"field {name!r} is empty")
    return value.strip()


def _prompt(value: Any, name: str) -> str:
    if isinstance(value, list):  # chat messages, as in DAPO-Math-17k
        users = [m.get("content") for m in value if isinstance(m, Mapping)
                 and m.get("role", "user") == "user"]
        value = users[-1] if users else _MISSING
    return _text(value, "prompt", name)


def _answer(row: Any, fields: Fields) -> str:
    value = _get(row, fields.answer)
    if value is not _MISSING and value is not None and str(value).strip():
        return _text(value, "answer", fields.answer)
    solution = _get(row, fields.solution)
    if isinstance(solution, str):
        boxed = extract_boxed(solution)
        if boxed:
            return boxed
        raise _Malformed("missing_answer", f"no answer field and no \\boxed{{}} in "
                                           f"field {fields.solution!r}")
    raise _Malformed("missing_answer", f"field {fields.answer or fields.solution!r} "
                                       "is missing or empty")


def _choices(value: Any, name: str) -> tuple[str, ...]:
    if value is _MISSING or value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise _Malformed("bad_choices", f"field {name!r} is a {type(value).__name__}, "
                                        "expected a list of strings")
    out = []
    for k, c in enumerate(value):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = str(c)
        if not isinstance(c, str) or not c.strip():
            raise _Malformed("bad_choices", f"choice {k} of field {name!r} is {c!r}")
        out.append(c.strip())
    return tuple(out)


def _images(value: Any, name: str, base_dir: Path, check: bool) -> tuple[bytes, ...]:
    if value is _MISSING or value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for k, item in enumerate(value):
        data = item
        if isinstance(item, Mapping):  # Hugging Face Image feature: {"bytes", "path"}
            data = item.get("bytes") or item.get("path")
        if isinstance(data, str):  # a path, relative to the data file
            try:
                data = (base_dir / data).read_bytes()
            except OSError as e:
                raise _Malformed("bad_image", f"image {k} of field {name!r}: {e}") from None
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise _Malformed("bad_image", f"image {k} of field {name!r} has no bytes or path")
        if check:
            _check_image(bytes(data), k, name)
        out.append(bytes(data))
    return tuple(out)


def _check_image(data: bytes, k: int, name: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: verify() misses truncated pixel data
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb..)
        raise _Malformed("bad_image", f"image {k} of field {name!r} does not decode: "
                                      f"{type(e).__name__}: {e}") from None


def _row_to_record(row: Any, fields: Fields, *, file: Path, label: str, source: str,
                   check_images: bool = True) -> Record:
    """One row as a Record; raises _Malformed (reason, detail) if it cannot be one."""
    if isinstance(row, Exception):
        raise _Malformed("bad_json", str(row))
    if not isinstance(row, Mapping):
        raise _Malformed("bad_row", f"a row must be an object, got {type(row).__name__}")
    prompt = _prompt(_get(row, fields.prompt), fields.prompt)
    answer = _answer(row, fields)
    choices = _choices(_get(row, fields.choices), fields.choices)
    # Images last: decoding them is the only costly check.
    images = _images(_get(row, fields.images), fields.images, file.parent, check_images)
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise _Malformed("image_count", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders in "
                                        f"the prompt but {len(images)} images")
    raw_id = _get(row, fields.id)
    meta = {k: v for k in fields.meta if (v := _get(row, k)) is not _MISSING}
    return Record(prompt=prompt, answer=answer, images=images, choices=choices,
                  id=f"{file.name}:{label}" if raw_id is _MISSING or raw_id is None
                  else str(raw_id),
                  source=source, meta=meta)


def _check_columns(path: Path, fields: Fields) -> list[str]:
    """The parquet columns to read; a clear error if a required one is absent."""
    names = parquet_columns(path)
    wanted = [f for f in (fields.prompt, fields.answer, fields.solution, fields.images,
                          fields.choices, fields.id, *fields.meta) if f]
    top = {f.split(".")[0] for f in wanted}
    need = [("prompt", fields.prompt)]
    if not any(f and f.split(".")[0] in names for f in (fields.answer, fields.solution)):
        need.append(("answer", fields.answer or fields.solution))
    for role, f in need:
        if f.split(".")[0] not in names:
            raise ValueError(f"{path}: column {f.split('.')[0]!r} (fields.{role}={f!r}) not "
                             f"found; the columns are {names}. Set the field names in the data "
                             f"config to match, e.g. fields.{role}={names[0]!r}.")
    return [n for n in names if n in top]


def load_source(path: str | os.PathLike, split: str | None = "train", *,
                fields: Fields = Fields(), name: str | None = None,
                hint: DownloadHint | None = None, check_images: bool = True,
                max_rows: int | None = None) -> RecordSource:
    """Read and check every row of `split` under `path` (see `uecjax.data.files`).

    Args:
      path: a .parquet/.jsonl/.json file, a glob, or a directory with split files.
      split: which split's files to read from a directory (ignored for a single file).
      fields: field names (`GEOMETRY3K_FIELDS`, `MATH_FIELDS`, or your own).
      name: `Record.source` of the records (default: the path's name).
      hint: how to download the data, used in the message if the path is missing.
      check_images: fully decode every image once now, skipping rows whose images fail.
      max_rows: stop after this many good records (quick experiments).
    """
    files = resolve_files(path, split, hint=hint)
    name = name or Path(str(path)).name
    skipped = SkipCounter()
    records: list[Record] = []
    for file in files:
        columns = _check_columns(file, fields) if file.suffix == ".parquet" else None
        for label, row in iter_rows(file, columns):
            try:
                records.append(_row_to_record(row, fields, file=file, label=label,
                                              source=name, check_images=check_images))
            except _Malformed as e:
                skipped.skip(str(file), label, e.reason, e.detail)
            if max_rows is not None and len(records) >= max_rows:
                break
        if max_rows is not None and len(records) >= max_rows:
            break
    skipped.log_summary()
    if not records:
        raise ValueError(f"no usable rows in {[str(f) for f in files]}: {skipped.as_dict()}. "
                         f"Check the field names ({fields}) against the files.")
    return RecordSource(records, name=name, files=files, skipped=skipped)


def geometry3k_source(path: str | os.PathLike, split: str = "train", **kwargs) -> RecordSource:
    """Geometry3K as on the hub (hiyouga/geometry3k): images, problem, answer[, id, choices,
    ground_truth]. `kwargs` go to `load_source`."""
    kwargs.setdefault("fields", GEOMETRY3K_FIELDS)
    kwargs.setdefault("name", "geometry3k")
    return load_source(path, split, hint=GEOMETRY3K_HINT, **kwargs)


def math_source(path: str | os.PathLike, split: str = "train", **kwargs) -> RecordSource:
    r"""A math dataset with problem and answer, or a solution whose last \boxed{} is the
    answer (MATH, MATH-500, ...). `kwargs` go to `load_source`."""
    kwargs.setdefault("fields", MATH_FIELDS)
    kwargs.setdefault("name", "math")
    kwargs.setdefault("hint", MATH_HINT)
    return load_source(path, split, **kwargs)

