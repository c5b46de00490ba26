"""Batched sampling with a KV cache: a jitted prefill and a jitted `lax.while_loop` decode.

    sampler = Sampler(model)
    out = sampler([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=64, n=4, stop_token_ids=(2,)))

Rows are prompt-major: row `i * n + j` is sample j of prompt i. Prompt lengths, response
budgets, prompt counts and image patches are bucketed, so new shapes inside a bucket reuse the
compiled functions (`compile_count`); the model's parameters are read at every call, so
training them in place needs no recompile. `logprobs[r, t]` is log p(token) under
softmax(logits / T), before top-k / top-p truncation. Images (Qwen2.5-VL): `images=`, one
`PromptImages` or None per prompt. On a mesh (`Sampler(model, mesh=mesh)`) each device
prefills and decodes only its rows (data x fsdp, KV heads over tensor), and the samples do
not depend on the mesh; `hosts=` gives each process its own block. Decoding is continuous
(`uecjax.continuous`: slots refilled as sequences end) or static (one batch until the longest
ends, the reference), with the same tokens: every draw's key depends on (seed, prompt,
sample, position) only (`uecjax.token_sampling`). docs/DESIGN.md, "The sampler".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from uecjax.batch import positions_from_mask
from uecjax.continuous import ContinuousDecoder
from uecjax.models.config import VLConfig
from uecjax.models.qwen2 import KVCache
from uecjax.parallel.hosts import Hosts
from uecjax.parallel.mesh import BATCH_AXES, batch_shards, global_batch
from uecjax.token_sampling import _sample, sequence_keys, token_keys
from uecjax.vision_inputs import (DEFAULT_PATCH_BUCKETS, PromptImages, patch_bucket, stack_images,
                                  vision_rows)

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_RESPONSE_BUCKETS = DEFAULT_PROMPT_BUCKETS
STOP_IDS_WIDTH = 8  # stop-token ids are padded to a multiple of this (static shape)
BATCHING = ("auto", "continuous", "static")
MAX_SLOTS = 128  # continuous batching's default slot count at most (the long-tail benchmark)
MIN_SLOTS = 8  # ... and its smallest compacted batch
STATIC_BELOW = 8  # auto: calls with fewer sequences than this decode statically

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1  # samples per prompt
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0 or self.n < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 0 and n={self.n} >= 1")


@dataclasses.dataclass
class SamplerOutput:
    """Host numpy arrays, one row per sample (prompt-major)."""

    prompt_tokens: np.ndarray  # [N, P] int32, left-padded with pad_id
    prompt_mask: np.ndarray  # [N, P] int32, 1 on real prompt tokens
    response_tokens: np.ndarray  # [N, max_new_tokens] int32, pad_id after the end
    response_mask: np.ndarray  # [N, max_new_tokens] int32, 1 on generated tokens (stop token included)
    logprobs: np.ndarray  # [N, max_new_tokens] float32, 0 where response_mask is 0
    truncated: np.ndarray  # [N] bool: reached its length limit without a stop token
    # The decode loop's work: slot-steps run (rows x steps, summed over the batch sizes a
    # continuous call compacts to) and those that generated a token; `batching` is the path.
    slot_steps: int = 0
    useful_slot_steps: int = 0
    batching: str = "static"

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)

    @property
    def slot_utilization(self) -> float:
        return self.useful_slot_steps / max(self.slot_steps, 1)


def bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


class Sampler:
    """Generates from an nnx causal LM with `hidden_states`/`logits`/`init_cache` (Qwen2, or
    Qwen2_5_VL with images).

    mesh: the (data, fsdp, tensor) mesh the model's parameters are placed on; rows are then
    split over data x fsdp and the KV cache's heads over tensor (module docstring). None: the
    arrays go where the parameters are and the compiler lays them out (one device: unchanged).

    batching: "continuous" decodes in `slots` slots refilled as sequences finish
    (`uecjax.continuous`); "static" decodes every sequence in one batch until the longest
    ends (the reference); "auto" is continuous for one process and at least STATIC_BELOW
    sequences, else static. Both give the same tokens for the same seed. slots: None = the
    call's sequence count rounded up to a power of two, at most MAX_SLOTS (on a mesh a
    multiple of data x fsdp).
    """

    def __init__(self, model, *, pad_id: int = 0, prompt_buckets=DEFAULT_PROMPT_BUCKETS,
                 response_buckets=DEFAULT_RESPONSE_BUCKETS, cache_dtype=None,
                 patch_buckets=DEFAULT_PATCH_BUCKETS, mesh: Mesh | None = None,
                 batching: str = "auto", slots: int | None = None):
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: choose from {BATCHING}")
        if slots is not None and slots < 1:
            raise ValueError(f"slots={slots}: must be >= 1 (or None for the default)")
        self.model = model
        self.mesh = mesh
        self.pad_id = pad_id
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.response_buckets = tuple(sorted(response_buckets))
        self.patch_buckets = tuple(sorted(patch_buckets))
        self.cache_dtype = cache_dtype
        self.batching = batching
        self.slots = slots
        self.compile_count = 0  # traces of the compiled pieces; grows only on a new bucket
        self._prefill = jax.jit(self._prefill_fn,
                                static_argnames=("graphdef", "num_slots", "n", "mode", "prompt_axes"))
        self._decode = jax.jit(self._decode_fn, static_argnames=("graphdef", "mode"),
                               donate_argnames=("cache",))
        self._continuous = ContinuousDecoder(self)

    # -- jitted pieces ----------------------------------------------------------------------
    def _prefill_fn(self, graphdef, state, tokens, mask, positions, vision, prompt_index, limits,
                    key, temperature, top_p, stop_ids, *, num_slots, n, mode, prompt_axes):
        self.compile_count += 1  # runs at trace time only
        model = nnx.merge(graphdef, state)
        B, P = tokens.shape
        if positions.ndim == 3:  # M-RoPE positions come row-major [B, 3, P] (rows shard)
            positions = positions.transpose(1, 0, 2)
        cache = model.init_cache(B, num_slots, self.cache_dtype)
        # [layers, prompts, kv_heads, slots, head_dim]: prompts as the inputs, heads on tensor.
        heads = self._kv_axis(cache.k.shape[2])
        cache = KVCache(*(self._constrain(c, None, prompt_axes, heads) for c in cache))
        key_mask = jnp.pad(mask, ((0, 0), (0, num_slots - P)), constant_values=1)
        # vision: None (text), or (pixel_values, layouts) per prompt row; positions [B, P] or
        # M-RoPE's [3, B, P].
        x = model.embed_tokens(tokens) if vision is None else model.embed_rows(tokens, *vision)
        hidden, cache = model.hidden_states(x, positions, key_mask, cache=cache, cache_index=0)
        logits = model.logits(hidden[:, -1:])[:, 0]
        # n samples per prompt share one prefill: repeat the cache, not the computation.
        repeat = functools.partial(jnp.repeat, repeats=n, axis=0)
        # The decode loop takes the cache as per-layer arrays (see Qwen2.hidden_states(layers=)).
        # On a mesh the repeated rows split over data x fsdp (each device keeps its own rows).
        cache = KVCache(tuple(self._rows(jnp.repeat(k, n, axis=0), heads) for k in cache.k),
                        tuple(self._rows(jnp.repeat(v, n, axis=0), heads) for v in cache.v))
        logits, key_mask = self._rows(repeat(logits)), self._rows(repeat(key_mask))
        keys = self._rows(sequence_keys(key, repeat(prompt_index), jnp.tile(jnp.arange(n), B)))
        token, logp = _sample(logits, token_keys(keys, 0), temperature, top_p, **mode._asdict())
        stopped = jnp.isin(token, stop_ids)
        done = stopped | (repeat(mask).sum(axis=1) == 0) | (limits <= 1)
        return (cache, key_mask, keys, self._rows(token), self._rows(logp), self._rows(done),
                self._rows(stopped))

    def _decode_fn(self, graphdef, state, cache, key_mask, keys, prompt_mask, position_offset,
                   limits, first_token, first_logp, done, stopped, temperature, top_p, stop_ids,
                   max_new_tokens, *, mode, stop_early: bool = True):
        self.compile_count += 1
        model = nnx.merge(graphdef, state)
        # Per-layer weights, sliced once per call: see Qwen2.hidden_states(layers=).
        layers = model.layer_list()
        B = first_token.shape[0]
        P = prompt_mask.shape[1]
        R = key_mask.shape[1] - P
        tokens = jnp.full((B, R), self.pad_id, jnp.int32).at[:, 0].set(first_token)
        logps = jnp.zeros((B, R), jnp.float32).at[:, 0].set(first_logp)
        valid = jnp.zeros((B, R), bool).at[:, 0].set(True)
        heads = self._kv_axis(cache.k[0].shape[1])
        # On a mesh, every carried array keeps its rows split through the loop (no-op without).
        constrain = lambda cache, *rows: (  # noqa: E731
            jax.tree.map(lambda c: self._rows(c, heads), cache), *map(self._rows, rows))
        # A new token's position: the real tokens before it, shifted by M-RoPE's rope_deltas
        # after images (0 for text).
        positions = jnp.sum(prompt_mask, axis=1) + position_offset

        def cond(carry):
            step, done = carry[0], carry[4]
            if not stop_early:  # a fixed trip count: under vmap the loop counter stays unbatched
                return step < max_new_tokens
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            step, cache, tokens, logps, done, stopped, valid = carry
            last = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
            pos = (positions + step - 1)[:, None]
            hidden, cache = model.hidden_states(model.embed_tokens(last), pos, key_mask,
                                                cache=cache, cache_index=P + step - 1,
                                                layers=layers)
            logits = model.logits(hidden)[:, 0]
            token, logp = _sample(logits, token_keys(keys, step), temperature, top_p,
                                  **mode._asdict())
            token = jnp.where(done, self.pad_id, token)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
            logps = jax.lax.dynamic_update_slice_in_dim(
                logps, jnp.where(done, 0.0, logp)[:, None], step, axis=1)
            valid = jax.lax.dynamic_update_slice_in_dim(valid, ~done[:, None], step, axis=1)
            stop = ~done & jnp.isin(token, stop_ids)
            done = done | stop | (step + 1 >= limits)
            return step + 1, *constrain(cache, tokens, logps, done, stopped | stop, valid)

        carry = (jnp.int32(1), *constrain(cache, tokens, logps, done, stopped, valid))
        steps, cache, tokens, logps, done, stopped, valid = jax.lax.while_loop(cond, body, carry)
        # The cache is returned (and dropped by the caller) so that its donated buffer aliases
        # the loop's: decoding updates it in place with no copy.
        useful = jnp.sum(valid[:, 1:], dtype=jnp.int32)  # tokens of the loop (not the prefill's)
        return tokens, logps, valid, stopped, (steps, useful), cache

    # -- host API -------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 images: Sequence[PromptImages | None] | None = None,
                 hosts: Hosts = Hosts(), response_limits: Sequence[int] | None = None
                 ) -> SamplerOutput:
        """Samples `params.n` responses per prompt. images: one entry per prompt (None for a
        prompt without images); the prompt must hold each image's tokens.

        hosts: with `hosts.count` > 1 (a multi-process run, `Hosts.of_mesh`), the
        prompts are `count` equal blocks, block b the prompts of the processes holding rows
        block b; each block is padded on its own so that its rows land on those processes'
        devices, and only this process's block of rows comes back (no gather across hosts).
        Several processes decode statically.

        response_limits: per returned row (this process's prompts x n, prompt-major), a
        response length limit <= max_new_tokens: the row ends there (truncated) unless a stop
        id comes first. For per-sequence budgets, and for benchmarks that force long-tailed
        lengths.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts: give one "
                             "per prompt (None where a prompt has no images)")
        if len(prompts) % hosts.count:
            raise ValueError(f"{len(prompts)} prompts do not make {hosts.count} equal blocks")
        num_prompts = len(prompts) // hosts.count  # this process's block
        rows = num_prompts * params.n
        limits = self._limits(response_limits, rows, params.max_new_tokens)
        P = bucket(max(len(p) for p in prompts), self.prompt_buckets)
        R = bucket(params.max_new_tokens, self.response_buckets)
        per_share = self._num_prompt_rows(num_prompts, params.n, hosts.count)  # padded prompts
        B = per_share * hosts.count
        # Block b of the prompts starts at row b * per_share (its padding after it).
        slot = [b * per_share + i for b in range(hosts.count) for i in range(num_prompts)]
        tokens = np.full((B, P), self.pad_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        # Each prompt row's index in the call (padding rows: past the end), for its samples' keys.
        prompt_index = np.arange(len(prompts), len(prompts) + B, dtype=np.int32)
        for k, (i, p) in enumerate(zip(slot, prompts)):
            tokens[i, P - len(p):] = p
            mask[i, P - len(p):] = 1
            prompt_index[i] = k
        if images is not None:
            placed = [None] * B
            for i, im in zip(slot, images):
                placed[i] = im
            images = placed
        width = -(-max(len(params.stop_token_ids), 1) // STOP_IDS_WIDTH) * STOP_IDS_WIDTH
        stop_ids = np.full((width,), -1, np.int32)
        stop_ids[:len(params.stop_token_ids)] = params.stop_token_ids
        mode = _Mode(greedy=params.temperature == 0, top_k=params.top_k, use_top_p=params.top_p < 1.0)
        sampling = (np.float32(params.temperature or 1.0), np.float32(params.top_p), stop_ids)
        key = jax.random.key(params.seed)

        # Row limits in the padded layout, this process's rows at the start of its block (each
        # process places only its own rows' values).
        all_limits = np.full((B * params.n,), params.max_new_tokens, np.int32)
        own = slice(hosts.index * per_share * params.n, hosts.index * per_share * params.n + rows)
        all_limits[own] = limits

        positions, offset, vision = self._positions_and_vision(tokens, mask, images)
        graphdef, state = nnx.split(self.model)
        if self._use_continuous(rows, hosts):
            return self._call_continuous(graphdef, state, tokens, mask, positions, vision, offset,
                                         prompt_index, all_limits, rows, key, sampling, params,
                                         mode, R)

        prompt_axes = self._prompt_axes(B)
        prompt_in = self._place((tokens, mask, positions, vision, prompt_index), prompt_axes)
        limits_in = self._place(all_limits, BATCH_AXES)
        cache, key_mask, keys, token, logp, done, stopped = self._prefill(
            graphdef, state, *prompt_in, limits_in, key, *sampling,
            num_slots=P + R, n=params.n, mode=mode, prompt_axes=prompt_axes)
        prompt_mask = np.repeat(mask, params.n, axis=0)
        rows_in = self._place((prompt_mask, np.repeat(offset, params.n)), BATCH_AXES)
        out_tokens, out_logps, valid, stopped, steps, _ = self._decode(
            graphdef, state, cache, key_mask, keys, *rows_in, limits_in, token, logp,
            done, stopped, *sampling, np.int32(params.max_new_tokens), mode=mode)
        steps, useful = (int(x) for x in steps)  # the decode loop's, over every row
        T = params.max_new_tokens
        # This process's block of rows (with one share: whole arrays on every host, a gather
        # where they are split across hosts), then its real rows.
        out_tokens, out_logps, valid, stopped = (hosts.take(x)[:rows]
                                                 for x in (out_tokens, out_logps, valid, stopped))
        valid = valid[:, :T]
        return SamplerOutput(
            prompt_tokens=np.repeat(tokens, params.n, axis=0)[own],
            prompt_mask=prompt_mask[own],
            response_tokens=np.where(valid, out_tokens[:, :T], self.pad_id).astype(np.int32),
            response_mask=valid.astype(np.int32),
            logprobs=np.where(valid, out_logps[:, :T], 0.0).astype(np.float32),
            truncated=~stopped,
            slot_steps=B * params.n * (steps - 1), useful_slot_steps=useful, batching="static")

    # -- continuous batching ----------------------------------------------------------------
    def _use_continuous(self, rows: int, hosts: Hosts) -> bool:
        if self.batching == "static" or hosts.count > 1:
            return False
        return self.batching == "continuous" or rows >= STATIC_BELOW

    def num_slots(self, rows: int) -> int:
        """The continuous path's slot count for a call of `rows` sequences."""
        slots = self.slots or min(bucket(rows, [2**i for i in range(30)]), MAX_SLOTS)
        if self.mesh is not None:
            shards = batch_shards(self.mesh)
            slots = -(-slots // shards) * shards
        return slots

    def _call_continuous(self, graphdef, state, tokens, mask, positions, vision, offset,
                         prompt_index, all_limits, rows, key, sampling, params, mode, R
                         ) -> SamplerOutput:
        """One process's call (rows: its real sequences, first in prompt-major order)."""
        n = params.n
        B = tokens.shape[0]
        temperature, top_p, stop_ids = sampling
        prompt_axes = self._prompt_axes(B)
        prompt_in = self._place((tokens, mask, positions, vision, offset, prompt_index), prompt_axes)
        S = self.num_slots(rows)
        cd = self._continuous
        prompts, slots, work = cd.prefill(graphdef, state, *prompt_in, all_limits, key,
                                          temperature, top_p, stop_ids, n=n, mode=mode,
                                          slots=S, R=R)
        shards = batch_shards(self.mesh) if self.mesh is not None else 1
        while True:
            shrink = S // 2 >= max(MIN_SLOTS, shards) and (S // 2) % shards == 0
            slots, work = cd.run(graphdef, state, slots, work, prompts, np.int32(rows),
                                 temperature, top_p, stop_ids, n=n, mode=mode,
                                 insert=max(1, S // 8), shrink_at=S // 2 if shrink else -1)
            if not shrink or (int(work.next_seq) >= rows and bool(jnp.all(slots.free))):
                break
            slots = cd.compact(slots)
            S //= 2
        T = params.max_new_tokens
        lengths = np.asarray(work.lengths)[:rows]
        valid = np.arange(T)[None, :] < lengths[:, None]
        return SamplerOutput(
            prompt_tokens=np.repeat(tokens, n, axis=0)[:rows],
            prompt_mask=np.repeat(mask, n, axis=0)[:rows],
            response_tokens=np.where(valid, np.asarray(work.tokens)[:rows, :T], self.pad_id).astype(np.int32),
            response_mask=valid.astype(np.int32),
            logprobs=np.where(valid, np.asarray(work.logps)[:rows, :T], 0.0).astype(np.float32),
            truncated=~np.asarray(work.stopped)[:rows],
            slot_steps=int(work.slot_steps), useful_slot_steps=int(work.useful),
            batching="continuous")

    @staticmethod
    def _limits(response_limits, rows: int, max_new_tokens: int) -> np.ndarray:
        if response_limits is None:
            return np.full((rows,), max_new_tokens, np.int32)
        limits = np.asarray(response_limits)
        if limits.shape != (rows,):
            raise ValueError(f"response_limits has shape {limits.shape}: give one limit per "
                             f"returned row ({rows} = prompts x n)")
        if limits.min() < 1 or limits.max() > max_new_tokens:
            raise ValueError(f"response_limits must lie in [1, max_new_tokens={max_new_tokens}], "
                             f"got [{limits.min()}, {limits.max()}]")
        return limits.astype(np.int32)

    def generate_traced(self, state, tokens, mask, key, *, n: int, max_new_tokens: int,
                        temperature: float = 1.0, stop_token_ids: Sequence[int] = ()):
        """Prefill and decode as traced code, for a caller's own `jit` / `vmap` (the compiled
        testbed, `uecjax.testbed`): the same `_prefill_fn` / `_decode_fn` as `__call__`, with
        device arrays in and out and no host step in between.

        state: the model's nnx.State (traced, e.g. the train step's params); tokens, mask
        [B, P] int32, left-padded prompts; key a PRNG key; temperature may be traced. Text
        only, no mesh, no bucketing: R = max_new_tokens. The decode loop runs all R steps
        (no early exit once every row is done), so that under `vmap` its counter stays a
        scalar. Returns (response tokens [B * n, R] int32 (pad_id after the end), valid
        [B * n, R] bool, log-probs [B * n, R] float32 at the temperature, finished [B * n]
        bool: a stop token was emitted).
        """
        if self.mesh is not None:
            raise ValueError("generate_traced runs without a mesh; build the Sampler with mesh=None")
        graphdef = nnx.graphdef(self.model)
        stop = np.full((max(STOP_IDS_WIDTH, -(-len(stop_token_ids) // STOP_IDS_WIDTH) * STOP_IDS_WIDTH),),
                       -1, np.int32)
        stop[:len(stop_token_ids)] = stop_token_ids
        mode = _Mode(greedy=False, top_k=0, use_top_p=False)
        temperature = jnp.asarray(temperature, jnp.float32)
        top_p = jnp.float32(1.0)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        B, P = tokens.shape
        limits = jnp.full((B * n,), max_new_tokens, jnp.int32)
        cache, key_mask, keys, token, logp, done, stopped = self._prefill_fn(
            graphdef, state, tokens, mask, positions, None, jnp.arange(B, dtype=jnp.int32),
            limits, key, temperature, top_p, stop,
            num_slots=P + max_new_tokens, n=n, mode=mode, prompt_axes=None)
        prompt_mask = jnp.repeat(mask, n, axis=0)
        offset = jnp.zeros((prompt_mask.shape[0],), jnp.int32)
        out, logps, valid, stopped, _, _ = self._decode_fn(
            graphdef, state, cache, key_mask, keys, prompt_mask, offset, limits, token, logp,
            done, stopped, temperature, top_p, stop, jnp.int32(max_new_tokens), mode=mode,
            stop_early=False)
        return jnp.where(valid, out, self.pad_id), valid, jnp.where(valid, logps, 0.0), stopped

    # -- layout on the mesh -----------------------------------------------------------------
    def _num_prompt_rows(self, num_prompts: int, n: int, blocks: int = 1) -> int:
        """Prompt rows of one of `blocks` blocks: a power of two, then on a mesh the smallest
        multiple of s / gcd(n, s) above it, s = data x fsdp / blocks (a block's devices), so
        that the rows (x n) split evenly."""
        B = bucket(num_prompts, [2**i for i in range(20)])
        if self.mesh is None:
            return B
        shards = batch_shards(self.mesh) // blocks
        unit = shards // math.gcd(n, shards)
        return -(-B // unit) * unit

    def _prompt_axes(self, num_prompts: int):
        """Mesh axes of the prefill's prompt axis: data x fsdp, else data, else none."""
        if self.mesh is None:
            return None
        if num_prompts % batch_shards(self.mesh) == 0:
            return BATCH_AXES
        if self.mesh.shape["data"] > 1 and num_prompts % self.mesh.shape["data"] == 0:
            return "data"
        return None

    def _kv_axis(self, kv_heads: int):
        """`tensor` for the cache's KV-head axis when the heads divide by it, else None."""
        if self.mesh is None or self.mesh.shape["tensor"] == 1 or kv_heads % self.mesh.shape["tensor"]:
            return None
        return "tensor"

    def _place(self, tree, axes):
        """Host arrays with a leading row axis -> global arrays with rows on `axes` (a mesh);
        unchanged without a mesh."""
        if self.mesh is None:
            return tree
        return global_batch(tree, NamedSharding(self.mesh, PartitionSpec(axes)))

    def _constrain(self, x, *spec):
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

    def _rows(self, x, *rest):
        """Rows (leading axis) over data x fsdp, the next axes as `rest` (default whole)."""
        return self._constrain(x, BATCH_AXES, *rest)

    def _positions_and_vision(self, tokens, mask, images):
        """Host-side (positions, decode position offsets [B], vision inputs or None)."""
        B = tokens.shape[0]
        if images is None or all(im is None for im in images):
            return positions_from_mask(mask), np.zeros((B,), np.int32), None
        config = self.model.config
        if not isinstance(config, VLConfig):
            raise ValueError("images were given but the model is a text model; load the "
                             "checkpoint as a Qwen2.5-VL model (from_pretrained without "
                             "language_model_only)")
        padded = list(images) + [None] * (B - len(images))
        width = patch_bucket(max(im.num_patches for im in images if im is not None), self.patch_buckets)
        stacked = stack_images(padded, config.vision.patch_dim, width)  # already bucket-wide: no copy
        rows = vision_rows(tokens, mask, *stacked, config, self.patch_buckets)
        # Positions stay row-major [B, 3, P] (rows lead, so they place like the other inputs);
        # the prefill transposes them to M-RoPE's [3, B, P].
        return rows.positions, rows.rope_deltas, (rows.pixel_values, rows.layouts)


class _Mode(NamedTuple):
    """Static sampling switches (hashable, so jit specialises on them)."""

    greedy: bool
    top_k: int
    use_top_p: bool
