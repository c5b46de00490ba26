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
not depend on the mesh; `hosts=` gives each process its own block. docs/DESIGN.md, "The sampler".
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
from uecjax.models.config import VLConfig
from uecjax.models.qwen2 import KVCache
from uecjax.parallel.hosts import Hosts
from uecjax.parallel.mesh import BATCH_AXES, batch_shards, global_batch
from uecjax.vision_inputs import (DEFAULT_PATCH_BUCKETS, PromptImages, patch_bucket, stack_images,
                                  vision_rows)

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_RESPONSE_BUCKETS = DEFAULT_PROMPT_BUCKETS
STOP_IDS_WIDTH = 8  # stop-token ids are padded to a multiple of this (static shape)

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
    truncated: np.ndarray  # [N] bool: reached max_new_tokens without a stop token

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(axis=1)


def bucket(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def _truncate_logits(logits, top_k: int, use_top_p: bool, top_p):
    """Masks tokens outside the top-k and the top-p nucleus (logits already temperature-scaled)."""
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if use_top_p:
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        # The smallest kept probability: the nucleus is every token at least this likely.
        kept = jnp.where(mass_before < top_p, sorted_probs, jnp.inf)
        logits = jnp.where(probs < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def _prefix_sums(x):
    """Inclusive cumulative sums along the last axis as a triangular matmul.

    XLA's CPU cumsum over a long axis is slow (about 0.8 ms for [16, 8192]); this stays exact
    in float32 (HIGHEST precision) on every backend.
    """
    n = x.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), x.dtype))
    return jnp.dot(x, upper, precision=jax.lax.Precision.HIGHEST)


def _argmax(x):
    """First index of the row maximum; cheaper than XLA CPU's variadic-reduce argmax."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)


def _inverse_cdf_sample(key, logits, lse):
    """Draws one token per row from softmax(logits) by inverting the CDF, in two levels.

    One uniform per row instead of one Gumbel per vocabulary entry (`jax.random.categorical`,
    whose random bits cost about 1 ms per [16, 8192] on CPU). The vocabulary is cut into
    ~sqrt(V) blocks: the uniform picks a block from the blocks' CDF, then a token inside it.
    Masked (-inf) tokens have zero mass, so the CDF is flat there and they are never drawn.
    """
    B, V = logits.shape
    c = -(-int(math.isqrt(V)) // 128) * 128
    n = -(-V // c)
    probs = jnp.pad(jnp.exp(logits - lse), ((0, 0), (0, n * c - V)))
    blocks = probs.reshape(B, n, c)
    block_mass = blocks.sum(axis=-1)
    block_cdf = _prefix_sums(block_mass)
    u = (1.0 - jax.random.uniform(key, (B, 1))) * block_cdf[:, -1:]  # in (0, total]
    block = jnp.minimum(jnp.sum(block_cdf < u, axis=-1), n - 1)
    pick = lambda a: jnp.take_along_axis(a, block[:, None], axis=1)[:, 0]
    inner_cdf = _prefix_sums(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0])
    rest = jnp.clip(u[:, 0] - (pick(block_cdf) - pick(block_mass)),
                    jnp.finfo(jnp.float32).tiny, inner_cdf[:, -1])
    inner = jnp.minimum(jnp.sum(inner_cdf < rest[:, None], axis=-1), c - 1)
    return jnp.minimum(block * c + inner, V - 1)


def _sample(logits, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """Next token [B] and its log-prob under softmax(logits / T) before truncation."""
    scaled = logits if greedy else logits / temperature
    lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    if greedy:
        token = _argmax(scaled)
    elif top_k or use_top_p:
        truncated = _truncate_logits(scaled, top_k, use_top_p, top_p)
        token = _inverse_cdf_sample(key, truncated, jax.nn.logsumexp(truncated, -1, keepdims=True))
    else:
        token = _inverse_cdf_sample(key, scaled, lse)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - lse[:, 0]


class Sampler:
    """Generates from an nnx causal LM with `hidden_states`/`logits`/`init_cache` (Qwen2, or
    Qwen2_5_VL with images).

    mesh: the (data, fsdp, tensor) mesh the model's parameters are placed on; rows are then
    split over data x fsdp and the KV cache's heads over tensor (module docstring). None: the
    arrays go where the parameters are and the compiler lays them out (one device: unchanged).
    """

    def __init__(self, model, *, pad_id: int = 0, prompt_buckets=DEFAULT_PROMPT_BUCKETS,
                 response_buckets=DEFAULT_RESPONSE_BUCKETS, cache_dtype=None,
                 patch_buckets=DEFAULT_PATCH_BUCKETS, mesh: Mesh | None = None):
        self.model = model
        self.mesh = mesh
        if mesh is not None and not jax.config.jax_threefry_partitionable:
            log.warning("jax_threefry_partitionable is off: sampled tokens on this mesh differ from "
                        "one device's where the mesh pads the rows (set it to True)")
        self.pad_id = pad_id
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self.response_buckets = tuple(sorted(response_buckets))
        self.patch_buckets = tuple(sorted(patch_buckets))
        self.cache_dtype = cache_dtype
        self.compile_count = 0  # traces of prefill + decode; grows only on a new bucket
        self._prefill = jax.jit(self._prefill_fn,
                                static_argnames=("graphdef", "num_slots", "n", "mode", "prompt_axes"))
        self._decode = jax.jit(self._decode_fn, static_argnames=("graphdef", "mode"),
                               donate_argnames=("cache",))

    # -- jitted pieces ----------------------------------------------------------------------
    def _prefill_fn(self, graphdef, state, tokens, mask, positions, vision, key, temperature,
                    top_p, stop_ids, *, num_slots, n, mode, prompt_axes):
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
        token, logp = _sample(logits, jax.random.fold_in(key, 0), temperature, top_p, **mode._asdict())
        done = jnp.isin(token, stop_ids) | (repeat(mask).sum(axis=1) == 0)
        return cache, key_mask, self._rows(token), self._rows(logp), self._rows(done)

    def _decode_fn(self, graphdef, state, cache, key_mask, prompt_mask, position_offset,
                   first_token, first_logp, done, key, temperature, top_p, stop_ids,
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
            step, cache, tokens, logps, done, valid = carry
            last = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
            pos = (positions + step - 1)[:, None]
            hidden, cache = model.hidden_states(model.embed_tokens(last), pos, key_mask,
                                                cache=cache, cache_index=P + step - 1,
                                                layers=layers)
            logits = model.logits(hidden)[:, 0]
            token, logp = _sample(logits, jax.random.fold_in(key, step), temperature, top_p,
                                  **mode._asdict())
            token = jnp.where(done, self.pad_id, token)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
            logps = jax.lax.dynamic_update_slice_in_dim(
                logps, jnp.where(done, 0.0, logp)[:, None], step, axis=1)
            valid = jax.lax.dynamic_update_slice_in_dim(valid, ~done[:, None], step, axis=1)
            done = done | jnp.isin(token, stop_ids)
            return step + 1, *constrain(cache, tokens, logps, done, valid)

        carry = (jnp.int32(1), *constrain(cache, tokens, logps, done, valid))
        _, cache, tokens, logps, done, valid = jax.lax.while_loop(cond, body, carry)
        # The cache is returned (and dropped by the caller) so that its donated buffer aliases
        # the loop's: decoding updates it in place with no copy.
        return tokens, logps, valid, done, cache

    # -- host API -------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 images: Sequence[PromptImages | None] | None = None,
                 hosts: Hosts = Hosts()) -> SamplerOutput:
        """Samples `params.n` responses per prompt. images: one entry per prompt (None for a
        prompt without images); the prompt must hold each image's tokens.

        hosts: with `hosts.count` > 1 (a multi-process run, `Hosts.of_mesh`), the
        prompts are `count` equal blocks, block b the prompts of the processes holding rows
        block b; each block is padded on its own so that its rows land on those processes'
        devices, and only this process's block of rows comes back (no gather across hosts).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts: give one "
                             "per prompt (None where a prompt has no images)")
        if len(prompts) % hosts.count:
            raise ValueError(f"{len(prompts)} prompts do not make {hosts.count} equal blocks")
        num_prompts = len(prompts) // hosts.count  # this process's block
        P = bucket(max(len(p) for p in prompts), self.prompt_buckets)
        R = bucket(params.max_new_tokens, self.response_buckets)
        per_share = self._num_prompt_rows(num_prompts, params.n, hosts.count)  # padded prompts
        B = per_share * hosts.count
        # Block b of the prompts starts at row b * per_share (its padding after it).
        slot = [b * per_share + i for b in range(hosts.count) for i in range(num_prompts)]
        tokens = np.full((B, P), self.pad_id, np.int32)
        mask = np.zeros((B, P), np.int32)
        for i, p in zip(slot, prompts):
            tokens[i, P - len(p):] = p
            mask[i, P - len(p):] = 1
        if images is not None:
            placed = [None] * B
            for i, im in zip(slot, images):
                placed[i] = im
            images = placed
        width = -(-max(len(params.stop_token_ids), 1) // STOP_IDS_WIDTH) * STOP_IDS_WIDTH
        stop_ids = np.full((width,), -1, np.int32)
        stop_ids[:len(params.stop_token_ids)] = params.stop_token_ids
        mode = _Mode(greedy=params.temperature == 0, top_k=params.top_k, use_top_p=params.top_p < 1.0)
        temperature = np.float32(params.temperature or 1.0)
        top_p = np.float32(params.top_p)
        key = jax.random.key(params.seed)

        positions, offset, vision = self._positions_and_vision(tokens, mask, images)

        prompt_axes = self._prompt_axes(B)
        prompt_in = self._place((tokens, mask, positions, vision), prompt_axes)
        graphdef, state = nnx.split(self.model)
        cache, key_mask, token, logp, done = self._prefill(
            graphdef, state, *prompt_in, key, temperature, top_p, stop_ids,
            num_slots=P + R, n=params.n, mode=mode, prompt_axes=prompt_axes)
        prompt_mask = np.repeat(mask, params.n, axis=0)
        rows_in = self._place((prompt_mask, np.repeat(offset, params.n)), BATCH_AXES)
        out_tokens, out_logps, valid, done, _ = self._decode(
            graphdef, state, cache, key_mask, *rows_in, token, logp,
            done, key, temperature, top_p, stop_ids, np.int32(params.max_new_tokens), mode=mode)

        rows = num_prompts * params.n
        T = params.max_new_tokens
        # This process's block of rows (with one share: whole arrays on every host, a gather
        # where they are split across hosts), then its real rows.
        out_tokens, out_logps, valid, done = (hosts.take(x)[:rows]
                                              for x in (out_tokens, out_logps, valid, done))
        own = slice(hosts.index * per_share * params.n, hosts.index * per_share * params.n + rows)
        valid = valid[:, :T]
        return SamplerOutput(
            prompt_tokens=np.repeat(tokens, params.n, axis=0)[own],
            prompt_mask=prompt_mask[own],
            response_tokens=np.where(valid, out_tokens[:, :T], self.pad_id).astype(np.int32),
            response_mask=valid.astype(np.int32),
            logprobs=np.where(valid, out_logps[:, :T], 0.0).astype(np.float32),
            truncated=~done,
        )

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
        P = tokens.shape[1]
        cache, key_mask, token, logp, done = self._prefill_fn(
            graphdef, state, tokens, mask, positions, None, key, temperature, top_p, stop,
            num_slots=P + max_new_tokens, n=n, mode=mode, prompt_axes=None)
        prompt_mask = jnp.repeat(mask, n, axis=0)
        offset = jnp.zeros((prompt_mask.shape[0],), jnp.int32)
        out, logps, valid, done, _ = self._decode_fn(
            graphdef, state, cache, key_mask, prompt_mask, offset, token, logp, done, key,
            temperature, top_p, stop, jnp.int32(max_new_tokens), mode=mode, stop_early=False)
        return jnp.where(valid, out, self.pad_id), valid, jnp.where(valid, logps, 0.0), done

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
