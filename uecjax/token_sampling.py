"""Drawing one token per row from logits: temperature, top-k / top-p truncation, greedy, and
the per-sequence random streams that make sampling batch-invariant.

Every draw uses its own key, `token_keys(sequence_keys(seed, prompt, sample), position)`: a
sequence's tokens depend on (seed, prompt index, sample index, position) only, never on its
row, its slot or the rest of the batch (docs/DESIGN.md, "The sampler").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sequence_keys(seed_key, prompt_index, sample_index):
    """One key per sequence [B] from the call's key and int32 [B] prompt / sample indices."""
    fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
    keys = fold(seed_key, prompt_index)
    return jax.vmap(jax.random.fold_in)(keys, sample_index)


def token_keys(keys, position):
    """The keys [B] of each sequence's token at `position` (a scalar or [B] int32)."""
    position = jnp.broadcast_to(jnp.asarray(position, jnp.uint32), keys.shape)
    return jax.vmap(jax.random.fold_in)(keys, position)


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


def _inverse_cdf_sample(keys, logits, lse):
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
    uniform = jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)[:, None]  # one per row's key
    u = (1.0 - uniform) * block_cdf[:, -1:]  # in (0, total]
    block = jnp.minimum(jnp.sum(block_cdf < u, axis=-1), n - 1)
    pick = lambda a: jnp.take_along_axis(a, block[:, None], axis=1)[:, 0]
    inner_cdf = _prefix_sums(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0])
    rest = jnp.clip(u[:, 0] - (pick(block_cdf) - pick(block_mass)),
                    jnp.finfo(jnp.float32).tiny, inner_cdf[:, -1])
    inner = jnp.minimum(jnp.sum(inner_cdf < rest[:, None], axis=-1), c - 1)
    return jnp.minimum(block * c + inner, V - 1)


def _sample(logits, keys, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """Next token [B] and its log-prob under softmax(logits / T) before truncation; keys [B],
    one per row (`token_keys`)."""
    if greedy:  # one max for the token and the log-sum-exp, no gather: as fast as sampling
        top = jnp.max(logits, axis=-1, keepdims=True)
        token = jnp.min(jnp.where(logits == top, jnp.arange(logits.shape[-1]), logits.shape[-1]),
                        axis=-1)
        return token.astype(jnp.int32), -jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    scaled = logits / temperature
    lse = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)
    if top_k or use_top_p:
        truncated = _truncate_logits(scaled, top_k, use_top_p, top_p)
        token = _inverse_cdf_sample(keys, truncated, jax.nn.logsumexp(truncated, -1, keepdims=True))
    else:
        token = _inverse_cdf_sample(keys, scaled, lse)
    token = token.astype(jnp.int32)
    return token, jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - lse[:, 0]
