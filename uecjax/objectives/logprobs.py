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


def token_logprobs_and_entropy(hidden, out_weight, targets, *, chunk_size: int = 1024, temperature: float = 1.0):
    """Chunked, rematerialised log pi(target) and entropy over the full vocabulary (section 3).

    hidden [B, T, H] (final-norm hidden states), out_weight [H, V] (unembedding), targets [B, T]
    int32. The B*T tokens are padded to a multiple of chunk_size and processed one chunk at a
    time under `jax.checkpoint`, so at most [chunk_size, V] float32 logits live at once, in the
    forward and in the backward pass (which recomputes each chunk). Returns (logp, entropy),
    each [B, T] float32, equal to `naive_token_logprobs_and_entropy`, gradients included.
    """
    B, T, H = hidden.shape
    n = B * T
    chunk = min(chunk_size, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, H), ((0, pad), (0, 0))).reshape(-1, chunk, H)
    y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(-1, chunk)

    chunk_fn = jax.checkpoint(functools.partial(_logp_and_entropy, temperature=temperature))
    logp, ent = jax.lax.map(lambda hy: chunk_fn(hy[0], out_weight, hy[1]), (h, y))
    return logp.reshape(-1)[:n].reshape(B, T), ent.reshape(-1)[:n].reshape(B, T)
