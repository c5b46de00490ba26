"""Attention for the decoder and the vision tower, one function, several implementations.

`attention(q, k, v, mask, implementation=...)`: q [B, T, heads, D], k / v [B, kv_heads, S, D]
(the KV cache's layout), grouped-query when heads > kv_heads; returns [B, T, heads, D].

    xla      the exact reference: the full float32 [B, kv_heads, groups, T, S] scores.
    chunked  blockwise online softmax over key blocks under `lax.scan` with its own backward
             (the FlashAttention recurrences): memory grows with T * block, not T * S.
    cudnn    `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs.
    splash   the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu`), TPUs;
             runs on CPU in Pallas' interpret mode (slowly: tests only).
    auto     cudnn on GPU, splash on TPU where its block constraints hold, else chunked for
             long keys (S >= CHUNKED_FROM) and xla for short ones.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp


from uecjax.models.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
NEG_INF = float(jnp.finfo(jnp.float32).min)
# Below this many keys the reference's T x S scores are small and its two large matmuls beat
# the chunked scan's many small ones on CPU (experiments/benchmarks/attention.py).
CHUNKED_FROM = 1024
# Keys per block of the chunked path. One Qwen2.5-1.5B layer's attention at T = 2048 on CPU
# (float32, forward + backward): block 512 0.27 GiB of temporaries and 1.12 s, 256 0.14 GiB and
# 0.92 s, 128 0.09 GiB and 0.94 s; 256 is the fastest.
DEFAULT_BLOCK = 256


class Mask(NamedTuple):
    """Which keys each query sees: key j is visible to query i when kv_valid[b, j], when
    q_segments[b, i] == kv_segments[b, j] (if segments are given) and, if causal,
    kv_slots[b, j] <= q_slots[b, i]. Slots are indices in one causal order (the row's
    token index, or the cache slot), not RoPE positions."""

    q_slots: jax.Array | None = None  # [B, T] int32
    kv_slots: jax.Array | None = None  # [B, S] int32
    kv_valid: jax.Array | None = None  # [B, S] bool
    q_segments: jax.Array | None = None  # [B, T] int32
    kv_segments: jax.Array | None = None  # [B, S] int32

    @property
    def causal(self) -> bool:
        return self.q_slots is not None

    def dense(self, kv_index=slice(None)) -> jax.Array:
        """The [B, T, S'] boolean mask over the keys kv_index selects."""
        allowed = True
        if self.kv_valid is not None:
            allowed = self.kv_valid[:, None, kv_index]
        if self.q_segments is not None:
            allowed = allowed & (self.q_segments[:, :, None] == self.kv_segments[:, None, kv_index])
        if self.causal:
            allowed = allowed & (self.kv_slots[:, None, kv_index] <= self.q_slots[:, :, None])
        return jnp.asarray(allowed, bool)


def causal_mask(key_mask, cache_index=0, num_queries=None, segments=None) -> Mask:
    """The decoder's mask: T queries at slots cache_index + t over key_mask [B, S]'s slots
    (cache_index a scalar, or [B]: each row's own)."""
    B, S = key_mask.shape
    T = S if num_queries is None else num_queries
    start = jnp.asarray(cache_index, jnp.int32)
    start = start[:, None] if start.ndim else start
    q_slots = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    seg = (None, None) if segments is None else (segments, segments)
    return Mask(q_slots, kv_slots, key_mask.astype(bool), *seg)


def segment_mask(segment_ids) -> Mask:
    """Full attention within segments [B, L] (the vision tower's windows and frames)."""
    return Mask(q_segments=segment_ids, kv_segments=segment_ids)


def attention(q, k, v, mask: Mask, implementation: str = "xla", *, block: int | None = None):
    """block: the chunked path's key block (default DEFAULT_BLOCK)."""
    impl = resolve(implementation, q.shape[1], k.shape[2], mask, q.dtype)
    if impl == "xla":
        return reference_attention(q, k, v, mask)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask, block=block or DEFAULT_BLOCK)
    if impl == "cudnn":
        if implementation != "auto":
            return _cudnn(q, k, v, mask)
        try:  # cuDNN rejects some shapes / head dims at trace time: auto falls back
            return _cudnn(q, k, v, mask)
        except (ValueError, NotImplementedError, TypeError, RuntimeError):
            return chunked_attention(q, k, v, mask, block=block or DEFAULT_BLOCK)
    if impl == "splash":
        return _splash(q, k, v, mask, interpret=jax.default_backend() != "tpu")
    raise ValueError(f"attention implementation {implementation!r}: choose from {IMPLEMENTATIONS}")


def resolve(implementation: str, num_queries: int, num_keys: int, mask: Mask, dtype) -> str:
    """The implementation `auto` stands for on this backend and shape (others unchanged).
    A one-token decode step keeps the reference: its scores are one row per head."""
    if implementation != "auto":
        return implementation
    if num_queries == 1:
        return "xla"
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):  # cuDNN's dtypes
        return "cudnn"
    if backend == "tpu" and splash_supports(num_queries, num_keys, mask):
        return "splash"
    return "chunked" if num_keys >= CHUNKED_FROM else "xla"


def _grouped(q, kv_heads):
    """q [B, T, H, D] -> [B, kv_heads, groups, T, D]: the query heads of each KV head."""
    B, T, H, D = q.shape
    return q.reshape(B, T, kv_heads, H // kv_heads, D).transpose(0, 2, 3, 1, 4)


def _ungrouped(out):
    """[B, kv_heads, groups, T, D] -> [B, T, H, D]."""
    B, K, G, T, D = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, D)


def reference_attention(q, k, v, mask: Mask):
    B, T, H, D = q.shape
    K, S = k.shape[1], k.shape[2]
    # One batch axis (batch x KV heads) and one [groups * T] query axis per KV head: the
    # matmul shape XLA's CPU dot runs fastest, and no K/V repeated per query head.
    qg = _grouped(q, K).reshape(B * K, H // K * T, D)
    scores = jnp.einsum("bqd,bsd->bqs", qg, k.reshape(B * K, S, D),
                        preferred_element_type=jnp.float32).reshape(B, K, H // K, T, S)
    scores = jnp.where(mask.dense()[:, None, None], scores * D**-0.5, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(B * K, H // K * T, S)
    out = jnp.einsum("bqs,bsd->bqd", probs, v.reshape(B * K, S, D))
    return _ungrouped(out.reshape(B, K, H // K, T, D))


# -- chunked: online softmax over key blocks ----------------------------------------------

def chunked_attention(q, k, v, mask: Mask, *, block: int = DEFAULT_BLOCK):
    S = k.shape[2]
    block = min(block, S)
    pad = -S % block
    if pad:  # padded keys are invalid: they get no weight
        k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
        valid = jnp.ones(k.shape[:1] + (S,), bool) if mask.kv_valid is None else mask.kv_valid
        widen = lambda a, fill: None if a is None else jnp.pad(a, ((0, 0), (0, pad)), constant_values=fill)  # noqa: E731
        mask = mask._replace(kv_valid=widen(valid, False), kv_slots=widen(mask.kv_slots, 0),
                             kv_segments=widen(mask.kv_segments, -2))
    out = _flash(_grouped(q, k.shape[1]), k, v, mask, block)
    return _ungrouped(out)


def _blocks(x, block, axis):
    """x split along `axis` into [num_blocks, ..., block, ...] for lax.scan."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _mask_blocks(mask: Mask, block):
    """The key-side fields of the mask split in key blocks; query-side fields stay whole."""
    keys = {f: _blocks(getattr(mask, f), block, 1) for f in ("kv_slots", "kv_valid", "kv_segments")
            if getattr(mask, f) is not None}
    return keys


def _block_mask(mask: Mask, keys) -> jax.Array:
    return mask._replace(**keys).dense()[:, None, None]  # [B, 1, 1, T, block]


def _scores(qg, kb, allowed, scale):
    s = jnp.einsum("bkgtd,bksd->bkgts", qg, kb, preferred_element_type=jnp.float32)
    return jnp.where(allowed, s * scale, NEG_INF)


def _forward(qg, k, v, mask, block):
    B, K, G, T, D = qg.shape
    scale = D**-0.5

    def step(carry, xs):
        m, l, acc = carry
        kb, vb, keys = xs
        s = _scores(qg, kb, _block_mask(mask, keys), scale)
        m_new = jnp.maximum(m, s.max(-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return (m_new, l, acc * correction[..., None] + pv), None

    init = (jnp.full((B, K, G, T), NEG_INF, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, D), jnp.float32))
    xs = (_blocks(k, block, 2), _blocks(v, block, 2), _mask_blocks(mask, block))
    (m, l, acc), _ = jax.lax.scan(step, init, xs)
    return (acc / l[..., None]).astype(qg.dtype), m + jnp.log(l)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qg, k, v, mask, block):
    return _forward(qg, k, v, mask, block)[0]


def _flash_fwd(qg, k, v, mask, block):
    out, lse = _forward(qg, k, v, mask, block)
    return out, (qg, k, v, mask, out, lse)


def _flash_bwd(block, res, d_out):
    qg, k, v, mask, out, lse = res
    scale = qg.shape[-1] ** -0.5
    d_out32 = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]

    def step(dq, xs):
        kb, vb, keys = xs
        allowed = _block_mask(mask, keys)
        p = jnp.exp(_scores(qg, kb, allowed, scale) - lse[..., None])
        dv = jnp.einsum("bkgts,bkgtd->bksd", p, d_out32)
        dp = jnp.einsum("bkgtd,bksd->bkgts", d_out32, vb.astype(jnp.float32))
        ds = jnp.where(allowed, p * (dp - delta[..., None]), 0.0) * scale
        dq = dq + jnp.einsum("bkgts,bksd->bkgtd", ds, kb.astype(jnp.float32))
        dk = jnp.einsum("bkgts,bkgtd->bksd", ds, qg.astype(jnp.float32))
        return dq, (dk, dv)

    xs = (_blocks(k, block, 2), _blocks(v, block, 2), _mask_blocks(mask, block))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), xs)
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(k.shape)  # noqa: E731  [n, B, K, blk, D]
    mask_ct = jax.tree.map(lambda _: None, mask)
    return dq.astype(qg.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), mask_ct


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- accelerator kernels --------------------------------------------------------------------

def _cudnn(q, k, v, mask: Mask):
    """cuDNN's fused attention. Left padding and segments do not fit its sequence-length
    masks, so the mask goes in as a [B, 1, T, S] boolean (cuDNN applies it as a bias)."""
    return jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask=mask.dense()[:, None],
        implementation="cudnn")


SPLASH_BLOCK = 128


def splash_supports(num_queries: int, num_keys: int, mask: Mask) -> bool:
    """Splash needs self-attention over the same T tokens in blocks of SPLASH_BLOCK (no cache:
    a prefill into a longer cache or a decode step goes elsewhere)."""
    return num_queries == num_keys and num_queries % SPLASH_BLOCK == 0


def _splash(q, k, v, mask: Mask, *, interpret: bool):
    """Splash attention, one MQA kernel per KV head (its query heads share the head's keys).
    Causality is the kernel's own (token index order, so slots must be 0..T-1); padding and
    segments become segment ids: an invalid key gets a segment no real query has."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    B, T, H, D = q.shape
    if not splash_supports(T, k.shape[2], mask):
        raise ValueError(f"splash attention needs T == S and a multiple of {SPLASH_BLOCK}: "
                         f"T={T}, S={k.shape[2]}")
    groups = H // k.shape[1]
    base = splash.CausalMask((T, T)) if mask.causal else splash.FullMask((T, T))
    size = next(b for b in (512, 256, SPLASH_BLOCK) if T % b == 0)  # larger blocks: fewer steps
    blocks = splash.BlockSizes(
        block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size, block_kv_dkv=size,
        block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([base] * groups), block_sizes=blocks, interpret=interpret)
    q_seg = jnp.zeros((B, T), jnp.int32) if mask.q_segments is None else mask.q_segments
    kv_seg = jnp.zeros((B, T), jnp.int32) if mask.kv_segments is None else mask.kv_segments
    if mask.kv_valid is not None:  # T == S: the queries are the keys, so invalid ones see
        # only invalid keys (themselves among them, never an empty row)
        outside = jnp.iinfo(jnp.int32).min
        q_seg = jnp.where(mask.kv_valid, q_seg, outside)
        kv_seg = jnp.where(mask.kv_valid, kv_seg, outside)
    qg = _grouped(q * D**-0.5, k.shape[1])  # [B, K, G, T, D]; splash does not scale

    def one(qh, kh, vh, qs, ks):  # [G, T, D], [T, D], [T, D], [T], [T]
        return kernel(qh, kh, vh, segment_ids=splash.SegmentIds(q=qs, kv=ks))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qg, k, v, q_seg, kv_seg)
    return _ungrouped(out.astype(q.dtype))
