"""Clip-Cov and KL-Cov token selection, Cui et al. arXiv 2505.22617 (ALGORITHMS.md section 7).

Selections use fixed-k `lax.top_k` (k from the static total token count) and masks, so every
shape is static; the number actually selected is the fraction of the *valid* tokens, at least 1.
Pass the global batch (all devices, all micro-batches) so the covariance is centred over it.
"""

import math

import jax
import jax.numpy as jnp

from uecjax.objectives.policy_loss import abs_zero_grad


def token_cov(logp, adv, mask):
    """Cov_{i,t} = (A - mean A) * (log pi - mean log pi), means over valid tokens (section 7).

    logp, adv, mask [B, T]; returns float32 [B, T] without gradient.
    """
    m = mask.astype(jnp.float32)
    logp, adv = jax.lax.stop_gradient(logp.astype(jnp.float32)), jax.lax.stop_gradient(adv.astype(jnp.float32))
    n = jnp.maximum(m.sum(), 1.0)
    adv_mean = jnp.sum(jnp.where(m > 0, adv, 0.0)) / n
    logp_mean = jnp.sum(jnp.where(m > 0, logp, 0.0)) / n
    return (adv - adv_mean) * (logp - logp_mean)


def _select_top(scores, n_valid, frac):
    """0/1 float32 mask over the flat scores [N] of the ceil(frac * n_valid) (>= 1) highest
    scores; -inf scores (ineligible) are never selected."""
    n = scores.shape[0]
    k = min(n, max(1, math.ceil(frac * n)))  # static upper bound
    n_sel = jnp.maximum(1.0, jnp.ceil(frac * n_valid * (1.0 - 1e-6)))  # guard float32 rounding up
    values, idx = jax.lax.top_k(scores, k)
    keep = (jnp.arange(k) < n_sel) & (values > -jnp.inf)
    return jnp.zeros(n, jnp.float32).at[idx].set(keep.astype(jnp.float32))


def clip_cov(logp, adv, mask, key, *, frac: float = 2e-4, clip_lo: float = 1.0, clip_hi: float = 5.0,
             exclude=None):
    """Clip-Cov gradient mask [B, T] float32 (section 7): 0 on the dropped tokens, 1 elsewhere.

    Drops a uniformly random ceil(frac * n_valid) (>= 1) of the valid tokens with
    clip_lo < Cov < clip_hi (fewer if fewer are eligible). `exclude` [B, T] bool optionally
    removes tokens from eligibility (Cui et al. exclude tokens the PPO clip already clipped).
    Multiply the per-token policy loss by it.
    """
    cov = token_cov(logp, adv, mask).reshape(-1)
    eligible = (mask.reshape(-1) > 0) & (cov > clip_lo) & (cov < clip_hi)
    if exclude is not None:
        eligible &= ~exclude.reshape(-1).astype(bool)
    scores = jnp.where(eligible, jax.random.uniform(key, cov.shape), -jnp.inf)
    dropped = _select_top(scores, mask.astype(jnp.float32).sum(), frac)
    return (1.0 - dropped).reshape(mask.shape)


def kl_cov_mask(logp, adv, mask, *, frac: float = 2e-4):
    """0/1 float32 mask [B, T] of the top ceil(frac * n_valid) (>= 1) valid tokens by Cov (section 7)."""
    cov = token_cov(logp, adv, mask).reshape(-1)
    scores = jnp.where(mask.reshape(-1) > 0, cov, -jnp.inf)
    return _select_top(scores, mask.astype(jnp.float32).sum(), frac).reshape(mask.shape)


def kl_cov(logp, old_logp, adv, mask, *, frac: float = 2e-4, coef: float = 1.0):
    """KL-Cov extra per-token loss [B, T] (section 7): coef * |log pi - log pi_old| on the
    `kl_cov_mask` tokens, 0 elsewhere; differentiable in logp, with zero gradient where
    log pi == log pi_old (`abs_zero_grad`). Add it to the per-token policy loss."""
    selected = kl_cov_mask(logp, adv, mask, frac=frac)
    return coef * abs_zero_grad(logp.astype(jnp.float32) - old_logp.astype(jnp.float32)) * selected
