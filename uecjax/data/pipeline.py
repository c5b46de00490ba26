"""The grain pipeline over a source: seeded shuffle, epochs, per-host shards, image decoding.

    ds = make_dataset(source, seed=0)              # shuffled, reshuffled every epoch, repeated
    ds = shard_batches(ds, B, jax.process_index(), jax.process_count())  # a block of each batch
    it = make_iterator(ds)
    record = next(it)
    state = it.get_state()           # a small JSON-able dict, saved with the checkpoint
    it.set_state(state)              # on the same pipeline: continues where the saved run was

The training loop reads one seeded stream, the same on every host, and each host only its
block of every global batch of B records (`shard_batches`; `uecjax.setup.make_records`).
`make_dataset(shard_index=, shard_count=)` instead gives each host a fixed subset of rows
(`rows[shard_index::shard_count]`); either way each epoch is reshuffled with a seed folded
with the epoch number, so resuming only needs the position.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import grain

from uecjax.data.records import Record


def decode_images(record: Record) -> Record:
    """The record with its encoded images replaced by RGB `PIL.Image`s."""
    from PIL import Image

    if not record.images or not isinstance(record.images[0], (bytes, bytearray)):
        return record
    images = []
    for data in record.images:
        with Image.open(io.BytesIO(data)) as im:
            images.append(im.convert("RGB"))
    return dataclasses.replace(record, images=tuple(images))


def make_dataset(source, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 shard_index: int = 0, shard_count: int = 1, drop_remainder: bool = False,
                 decode: bool = True) -> grain.MapDataset:
    """A `grain.MapDataset` of Records over `source` (any sequence of Records).

    Args:
      seed: shuffle seed, in [0, 2**32).
      shuffle: shuffle (differently each epoch); False keeps the source order.
      num_epochs: passes over the data; None repeats forever (the length is then sys.maxsize).
      shard_index, shard_count: this host's shard of the rows (`jax.process_index()`,
        `jax.process_count()` for multi-host training).
      drop_remainder: drop the last `len(source) % shard_count` rows so that every host has
        the same number of rows (lock-step epochs across hosts).
      decode: turn image bytes into PIL images (lazily, as records are read).
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index}, shard_count={shard_count}: need "
                         "0 <= shard_index < shard_count")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed}: must be in [0, 2**32)")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs}: must be >= 1, or None to repeat forever")
    ds = grain.MapDataset.source(source)
    if drop_remainder:
        ds = ds[:len(ds) - len(ds) % shard_count]
    ds = ds[shard_index::shard_count]
    if len(ds) == 0:
        raise ValueError(f"shard {shard_index} of {shard_count} is empty: the source has only "
                         f"{len(source)} records")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if decode:
        ds = ds.map(decode_images)
    return ds


class BatchShardMapDataset(grain.MapDataset):
    """Host `shard_index`'s block of every global batch of `parent`.

    With k = batch_size // shard_count, element j of this view is parent element
    (j // k) * batch_size + shard_index * k + j % k: each global batch of `batch_size`
    consecutive elements is cut into `shard_count` blocks of k, one per host, in host order.
    Only this host's elements are ever read (and decoded) from the parent.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, batch_size: int, shard_index: int, shard_count: int):
        super().__init__(parent)
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index}, shard_count={shard_count}: need "
                             "0 <= shard_index < shard_count")
        if batch_size < 1 or batch_size % shard_count:
            raise ValueError(f"batch_size={batch_size} is not a positive multiple of "
                             f"shard_count={shard_count}")
        self.batch_size, self.shard_index, self.shard_count = batch_size, shard_index, shard_count
        self.block = batch_size // shard_count
        n = len(parent)
        full, rest = divmod(n, batch_size)  # a last partial batch is cut in host order too
        self._length = full * self.block + min(self.block, max(0, rest - shard_index * self.block))

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        batch, offset = divmod(index, self.block)
        return batch * self.batch_size + self.shard_index * self.block + offset

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            parent_index = self._parent_index(index)
        return self._parent[parent_index]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._parent_index(i) for i in indices])  # noqa: SLF001

    def __str__(self) -> str:
        return (f"BatchShardMapDataset(batch_size={self.batch_size}, "
                f"shard={self.shard_index}/{self.shard_count})")


def shard_batches(dataset: grain.MapDataset, batch_size: int, shard_index: int,
                  shard_count: int) -> grain.MapDataset:
    """`dataset` as host `shard_index` of `shard_count` reads it: its block of
    batch_size // shard_count elements of every global batch (`BatchShardMapDataset`);
    the dataset itself when shard_count == 1."""
    if shard_count == 1:
        return dataset
    return BatchShardMapDataset(dataset, batch_size, shard_index, shard_count)


def make_iterator(dataset: grain.MapDataset, *, num_threads: int = 2,
                  prefetch: int = 8) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state()` / `set_state(state)`) over `dataset`.

    `num_threads` decode records ahead of use, at most `prefetch` of them; the state counts
    the records handed out, not those prefetched, so a restored iterator continues exactly.
    """
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read))
