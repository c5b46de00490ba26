"""Data: records from Hugging Face parquet / JSON-lines files and the procedural demo and
countdown tasks, and the grain pipeline over them (per-host shard, seeded shuffle, epochs,
checkpointable iterator).

    source = geometry3k_source("/data/geometry3k", split="train")
    it = make_iterator(make_dataset(source, seed=0))
    record = next(it); state = it.get_state()
"""

from uecjax.data.countdown import countdown_records, countdown_source
from uecjax.data.demo import demo_records, demo_source
from uecjax.data.files import DataNotFoundError, DownloadHint, resolve_files
from uecjax.data.pipeline import decode_images, make_dataset, make_iterator, shard_batches
from uecjax.data.records import Record, SkipCounter
from uecjax.data.sources import (
    GEOMETRY3K_FIELDS,
    MATH_FIELDS,
    Fields,
    RecordSource,
    geometry3k_source,
    load_source,
    math_source,
)

__all__ = [
    "DataNotFoundError",
    "DownloadHint",
    "Fields",
    "GEOMETRY3K_FIELDS",
    "MATH_FIELDS",
    "Record",
    "RecordSource",
    "SkipCounter",
    "countdown_records",
    "countdown_source",
    "decode_images",
    "demo_records",
    "demo_source",
    "geometry3k_source",
    "load_source",
    "make_dataset",
    "make_iterator",
    "math_source",
    "resolve_files",
    "shard_batches",
]
