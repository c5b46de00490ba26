"""Token log-probs and entropies without materialising [B, T, V] logits (ALGORITHMS.md section 3)."""

import functools

import jax
import jax.numpy as jnp


def _logp_and_entropy(hidden, out_weight, targets, temperature):
    """hidden [N, H] @ out_weight [H, V] -> (log pi(target) [N], entropy [N]), float32."""
    logits = jnp.dot(hidden, out_weight, preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    probs = jnp.exp(logits - lse[:, None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)  # -sum p log p, with log p = logits - lse
    return target_logit - lse, entropy


def naive_token_logprobs_and_entropy(hidden, out_weight, targets, *, temperature: float = 1.0):
    """Reference for section 3: full [B, T, V] logits at once. Returns (logp, entropy) [B, T] f32."""
    B, T, H = hidden.shape
    logp, ent = _logp_and_entropy(hidden.reshape(B * T, H), out_weight, targets.reshape(B * T), temperature)
    return logp.reshape(B, T), ent.reshape(B, T)


def _chunk_stats(hidden, out_weight, targets, temperature):
    """(logp, entropy, logsumexp, E_p[z]) [N] of one token chunk, z = logits / T, float32."""
    z = jnp.dot(hidden, out_weight, preferred_element_type=jnp.float32) / temperature
    lse = jax.nn.logsumexp(z, axis=-1)
    mean_z = jnp.sum(jnp.exp(z - lse[:, None]) * z, axis=-1)
    target_z = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return target_z - lse, lse - mean_z, lse, mean_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(h, out_weight, y, chunk, temperature):
    return _chunked_fwd(h, out_weight, y, chunk, temperature)[0]


def _chunked_fwd(h, out_weight, y, chunk, temperature):
    """Forward over token chunks of [chunk, V] logits; keeps the inputs and two floats a token."""
    n, H = h.shape
    stats = jax.lax.map(lambda hy: _chunk_stats(hy[0], out_weight, hy[1], temperature),
                        (h.reshape(-1, chunk, H), y.reshape(-1, chunk)))
    logp, ent, lse, mean_z = (x.reshape(n) for x in stats)
    return (logp, ent), (h, out_weight, y, lse, mean_z)


def _chunked_bwd(chunk, temperature, residuals, cotangents):
    """Backward over vocabulary blocks of [N, chunk * V / N] logits (as many elements as a
    forward chunk). With p = softmax(z): d logp/dz = onehot(y) - p and dH/dz = -p (z - E_p z),
    so each block's logit cotangent comes from one recomputation, using the saved logsumexp
    and E_p z. The hidden-state gradient is accumulated in float32 ([N, H]); each column of
    the unembedding's gradient is computed once, in float32 over all N tokens, and written."""
    h, w, y, lse, mean_z = residuals
    g_logp, g_ent = cotangents
    n, V = h.shape[0], w.shape[1]
    block = max(1, min(V, chunk * V // n))

    def body(carry, b):
        dh, dw = carry
        start = jnp.minimum(b * block, V - block)  # the last block may overlap the one before
        w_blk = jax.lax.dynamic_slice_in_dim(w, start, block, axis=1)
        z = jnp.dot(h, w_blk, preferred_element_type=jnp.float32) / temperature
        col = start + jnp.arange(block)
        new = (col >= b * block)[None, :]  # columns no earlier block has done
        p = jnp.where(new, jnp.exp(z - lse[:, None]), 0.0)
        gz = jnp.where(new & (col[None, :] == y[:, None]), g_logp[:, None], 0.0)
        gz = ((gz - p * (g_logp[:, None] + g_ent[:, None] * (z - mean_z[:, None]))) / temperature).astype(w.dtype)
        dh = dh + jnp.dot(gz, w_blk.T, preferred_element_type=jnp.float32)
        dw_blk = jnp.dot(h.T, gz, preferred_element_type=jnp.float32).astype(w.dtype)
        old = jax.lax.dynamic_slice_in_dim(dw, start, block, axis=1)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, jnp.where(new, dw_blk, old), start, axis=1)
        return (dh, dw), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(w))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(-(-V // block)))
    return dh.astype(h.dtype), dw, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_and_entropy(hidden, out_weight, targets, *, chunk_size: int = 1024, temperature: float = 1.0):
    """Chunked, rematerialised log pi(target) and entropy over the full vocabulary (section 3).

    hidden [B, T, H] (final-norm hidden states), out_weight [H, V] (unembedding), targets [B, T]
    int32. The B*T tokens are padded to a multiple of chunk_size; the forward pass runs one
    [chunk_size, V] block of float32 logits at a time, and the backward pass (a custom VJP)
    recomputes logits one vocabulary block of the same size at a time, so the [B, T, V] logits
    never exist and no [H, V] float32 accumulator is needed. Returns (logp, entropy), each
    [B, T] float32, equal to `naive_token_logprobs_and_entropy`, gradients included (reverse
    mode; forward-mode differentiation is not defined for it).
    """
    B, T, H = hidden.shape
    n = B * T
    chunk = min(chunk_size, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, H), ((0, pad), (0, 0)))
    y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad))
    logp, ent = _chunked(h, out_weight, y, chunk, temperature)
    return logp[:n].reshape(B, T), ent[:n].reshape(B, T)
