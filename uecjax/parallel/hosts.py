"""The processes of a run and their rows: each process's share of every batch, the small
all-gathers through which the shares agree, and host views of global arrays.

    hosts = Hosts.of_mesh(mesh)               # this process's block of every batch's rows
    batch = hosts.put(my_rows, sharding)      # the shares' rows -> one global batch
    mine = hosts.take(global_array)           # this process's rows of a global array
    counts = hosts.gather(len(my_buffer))     # [value of each share], in block order

The rows of a batch split over the mesh's data x fsdp devices into `count` equal blocks; a
process samples, grades and keeps only its block, so host work does not grow with the number
of processes. Processes whose devices hold the same rows (a tensor axis across hosts) share a
block. One process (or a mesh where no process holds a block of its own): `Hosts()`, one
share, and every call above is local.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uecjax.parallel.gather import allgather_objects, host_array
from uecjax.parallel.mesh import BATCH_AXES, batch_shards, global_batch


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process's share of the batch rows: block `index` of `count`; `owners[b]` is the
    first process holding block b. `exchange` stands in for the all-gather in tests
    (obj -> [obj of each share]); None: `allgather_objects` over the processes."""

    index: int = 0
    count: int = 1
    owners: tuple[int, ...] = (0,)
    exchange: Callable[[object], list] | None = dataclasses.field(default=None, compare=False,
                                                                  repr=False)

    @staticmethod
    def of_mesh(mesh: Mesh, process_index: int | None = None,
                process_of=lambda device: device.process_index) -> "Hosts":
        """The share of `process_index` (default: this process) on `mesh`.

        Each process's devices must hold one consecutive block of the batch rows, the blocks
        of distinct processes equal and disjoint (a mesh over `jax.devices()`, whose order keeps
        a process's devices together, does); otherwise one share: every process takes the
        whole batch, as a single process does (correct, with repeated host work).
        """
        process_index = jax.process_index() if process_index is None else process_index
        shards = batch_shards(mesh)
        rows = _rows_by_process(NamedSharding(mesh, P(BATCH_AXES)), (shards,), process_of)
        blocks = sorted({(min(r), max(r) + 1) for r in rows.values()})
        size = blocks[0][1] - blocks[0][0]
        consecutive = all(len(r) == max(r) + 1 - min(r) for r in rows.values())
        if not consecutive or blocks != [(i * size, (i + 1) * size) for i in range(shards // size)]:
            return Hosts(0, 1, (min(rows),))
        owners = tuple(min(p for p, r in rows.items() if min(r) == start) for start, _ in blocks)
        return Hosts(index=min(rows[process_index]) // size, count=len(blocks), owners=owners)

    def block(self, num_rows: int) -> slice:
        """This share's rows of a batch of num_rows."""
        size = num_rows // self.count
        return slice(self.index * size, (self.index + 1) * size)

    def readers(self) -> tuple[int, int]:
        """(index, count) of this process's block of every prompt batch: its share's with
        several shares; with one, its process's (`GlobalPrompts` then all-gathers them)."""
        if self.count > 1:
            return self.index, self.count
        return jax.process_index(), jax.process_count()

    def gather(self, obj) -> list:
        """[obj of each share, in block order] on every process (a collective with several
        shares: every process calls); with one share [obj], no collective."""
        if self.count == 1:
            return [obj]
        if self.exchange is not None:
            return self.exchange(obj)
        everyone = allgather_objects(obj)
        return [everyone[p] for p in self.owners]

    def put(self, tree, sharding: NamedSharding):
        """This process's rows (numpy, the same count on every process) -> global jax Arrays
        with `count` times as many rows, block b from the processes holding block b. With one
        share the rows are the whole batch (`global_batch`). jax Arrays and None pass."""
        if self.count == 1:
            return global_batch(tree, sharding)

        def one(x):
            if x is None or isinstance(x, jax.Array):
                return x
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(
                sharding, x, (x.shape[0] * self.count,) + x.shape[1:])
        return jax.tree.map(one, tree)

    def take(self, x) -> np.ndarray:
        """This share's block of a global array's rows, as numpy, read from its own devices.

        With one share: the whole array (`host_array`). If the array's layout does not put each
        block whole on its processes' devices (the same test on every process), it is
        all-gathered and sliced: slower, still correct.
        """
        block = self.block(x.shape[0])
        if self.count == 1 or not isinstance(x, jax.Array) \
                or not _blocks_local(x.sharding, x.shape, self.count):
            return host_array(x)[block]
        pieces = {}
        for s in x.addressable_shards:
            start = s.index[0].start or 0
            if block.start <= start < block.stop:
                pieces.setdefault(start, s.data)
        out = np.concatenate([np.asarray(pieces[k]) for k in sorted(pieces)])
        if min(pieces, default=-1) != block.start or len(out) != block.stop - block.start:
            raise RuntimeError(f"rows {block} of a {x.shape} array are not on process "
                               f"{jax.process_index()}'s devices ({x.sharding})")
        return out


def _rows_by_process(sharding, shape, process_of=lambda device: device.process_index):
    """Process -> the set of row indices its devices hold of an array of `shape` on
    `sharding` (from the global layout: the same on every process); None when some device
    holds only part of the other axes."""
    rows: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        if any(i.indices(n)[:2] != (0, n) for i, n in zip(index[1:], shape[1:])):
            return None
        start, stop, _ = index[0].indices(shape[0])
        rows.setdefault(process_of(device), set()).update(range(start, stop))
    return rows


@functools.lru_cache(maxsize=256)
def _blocks_local(sharding, shape, count: int) -> bool:
    """Each process's devices hold exactly one whole block of the rows (one of `count`), full
    in the other axes. Cached: the sampler and scorer ask for every output array."""
    rows = _rows_by_process(sharding, shape)
    size = shape[0] // count
    return rows is not None and all(
        len(r) == size and min(r) % size == 0 and max(r) == min(r) + size - 1 for r in rows.values())


class GlobalPrompts:
    """The global prompt stream from each process's own block of it (one share: every process
    computes every row, but reads only its block of the records).

    Every `batch_size` draws, each process takes batch_size // process_count prompts from its
    `local` stream and `exchange` (`allgather_objects`) hands every process all blocks, in
    process order. With one process the local stream passes through, no collective. Draw
    whole batches only: the buffer is then empty between steps, so the local iterator's
    state is the whole stream position.
    """

    def __init__(self, local: Iterator, batch_size: int, process_count: int = 1,
                 exchange: Callable[[list], list[list]] = allgather_objects):
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not a multiple of "
                             f"process_count={process_count}")
        self.local, self.process_count, self.exchange = local, process_count, exchange
        self.per_process = batch_size // process_count
        self.pending: collections.deque = collections.deque()

    def __iter__(self):
        return self

    def __next__(self):
        if self.process_count == 1:
            return next(self.local)
        if not self.pending:
            mine = [next(self.local) for _ in range(self.per_process)]
            for block in self.exchange(mine):
                self.pending.extend(block)
        return self.pending.popleft()
