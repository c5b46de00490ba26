"""Sequence packing for the scoring and training forward passes (`train.pack`).

A padded batch row is `[left padding | prompt | response | right padding]`; the forward pass
only needs each row's real tokens. Packing lays the real input tokens of several rows
first-fit into packed rows of `tokens_per_row` slots; segment ids keep attention within each
sequence, and every token keeps its own (M-RoPE) position, so each sequence's hidden states
are the padded forward's. The decoder runs on the packed layout (embeddings, and a VL row's
image features, are computed per row and gathered in), and so does the lm-head when the
packed slots are fewer than the [B, R] response window; the response's log-probs and
entropies are gathered back to that window (or its hidden states, before the lm-head), so the
log-probs,
entropies and everything downstream (every loss aggregation, Clip-Cov / KL-Cov selection,
micro-batches) see the same arrays as without packing.

Packing is per block: the rows one device holds in one micro-batch are packed among
themselves (`blocks` = batch shards x micro-batches), so the gathers never cross devices.
Each block gets the same number of packed rows, rounded up to a bucket (a multiple of an
eighth of the block's row count) so the step compiles once per bucket, not per batch.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each packed slot's token comes from and where each response position's hidden
    state is, both local to the slot's block (see the module docstring for the row order)."""

    source: jax.Array  # [blocks * p, L] int32: index into the block's rows x (T - 1) inputs
    segments: jax.Array  # [blocks * p, L] int32: the row (within its block) of each slot, -1 empty
    response_slot: jax.Array  # [B, R] int32: index into the block's p x L slots (0 where unused)
    # blocks per micro-batch: the batch shards (each micro-batch's rows split into this many
    # contiguous blocks, one per shard)
    shards: int = dataclasses.field(metadata=dict(static=True), default=1)
    # Where the lm-head runs: on every packed slot (True: fewer slots than the [B, R] response
    # window, the usual case with long-tailed responses) or on the response window.
    head_on_slots: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def tokens_per_row(self) -> int:
        return self.source.shape[1]


PACKED_ROW_BUCKETS = 8


def packed_rows_bucket(needed: int, rows: int) -> int:
    """The number of packed rows a block of `rows` rows gets: `needed` rounded up to a multiple
    of rows / PACKED_ROW_BUCKETS, so a block size compiles at most that many shapes."""
    step = -(-rows // PACKED_ROW_BUCKETS)
    return min(rows, -(-max(needed, 1) // step) * step)


def first_fit(lengths, capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed first-fit (longest first) into bins of `capacity`."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit train.tokens_per_row={capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def pack(attention_mask: np.ndarray, response_len: int, *, tokens_per_row: int = 0,
         shards: int = 1, micro_batches: int = 1, head_on_slots: bool | None = None,
         agree=None) -> Packing:
    """The packed layout of a padded batch (attention_mask [B, T], T = prompt + response).

    Row k of the batch belongs to micro-batch k % micro_batches (`uecjax.scoring.split_micro`),
    and within a micro-batch the `shards` batch shards hold contiguous runs of rows: each
    (shard, micro-batch) is one packing block. tokens_per_row 0: T - 1, the longest input.
    head_on_slots None: where there are fewer positions (`Packing.head_on_slots`). agree:
    with several processes each packing its own rows (`Hosts.gather`, a collective), the
    packed row count they all use: the largest any needs.
    """
    mask = np.asarray(attention_mask)[:, :-1].astype(bool)  # the forward's inputs
    B, T1 = mask.shape
    R = response_len
    P = T1 + 1 - R
    L = tokens_per_row or T1
    blocks = shards * micro_batches
    if B % blocks:
        raise ValueError(f"{B} rows do not split into {shards} shards x {micro_batches} "
                         "micro-batches for packing")
    b = B // blocks
    lengths = mask.sum(axis=1)
    starts = mask.argmax(axis=1)  # real tokens are one contiguous run per row
    if not all(mask[i, s:s + n].all() for i, (s, n) in enumerate(zip(starts, lengths))):
        raise ValueError("packing needs each row's real tokens in one contiguous run "
                         "([left padding | prompt | response | right padding])")

    # block (shard d, micro m) holds rows m + M * (d * b + j), j < b, in this local order
    def block_rows(d, m):
        return [m + micro_batches * (d * b + j) for j in range(b)]

    layouts = {}
    for d in range(shards):
        for m in range(micro_batches):
            rows = block_rows(d, m)
            layouts[d, m] = first_fit([int(lengths[r]) for r in rows], L)
    needed = max(len(bins) for bins in layouts.values())
    p = packed_rows_bucket(needed if agree is None else max(agree(needed)), b)

    source = np.zeros((blocks * p, L), np.int32)
    segments = np.full((blocks * p, L), -1, np.int32)
    response_slot = np.zeros((B, R), np.int32)
    for (d, m), bins in layouts.items():
        rows = block_rows(d, m)
        for j, members in enumerate(bins):
            packed_row = d * p * micro_batches + j * micro_batches + m  # see split_micro
            offset = 0
            for local in members:
                r, n, s = rows[local], int(lengths[rows[local]]), int(starts[rows[local]])
                source[packed_row, offset:offset + n] = local * T1 + np.arange(s, s + n)
                segments[packed_row, offset:offset + n] = local
                # response position t is predicted by input column P - 1 + t
                cols = P - 1 + np.arange(R)
                real = (cols >= s) & (cols < s + n)
                response_slot[r, real] = j * L + offset + cols[real] - s
                offset += n
    if head_on_slots is None:
        head_on_slots = source.size < response_slot.size
    return Packing(source, segments, response_slot, shards, head_on_slots=bool(head_on_slots))


def packed_token_fraction(packing: Packing) -> float:
    """Share of packed slots that hold a token (1 = no padding left)."""
    return float((np.asarray(packing.segments) >= 0).mean())
