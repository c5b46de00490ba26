"""Clipped PPO policy loss and KL estimators, per token (ALGORITHMS.md section 4)."""

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


def abs_zero_grad(d):
    """|d| with gradient sign(d), which is 0 at d == 0 (section 4a).

    jnp.abs has derivative +1 at 0, so a penalty k |log pi - log pi_old| on fresh rows
    (ratio exactly 1) would push every selected token up; torch.abs, which Cui et al.'s
    KL-Cov was written with, gives 0 there. d * sign(d) is |d| exactly (sign is -1, 0, 1).
    """
    return d * jax.lax.stop_gradient(jnp.sign(d))


def ppo_clip_loss(logp, old_logp, adv, *, eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float = 3.0):
    """Per-token dual-clip PPO loss (section 4); all inputs [B, T], A broadcast per token.

        l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)                 if A >= 0
        l = -max(min(rho A, clip(rho) A), dual_clip * A)                          if A <  0

    Returns (loss [B, T] f32, indicators): float32 0/1 per token, to aggregate with the mask:
      clip_low:  A < 0 and rho < 1 - eps_low    (clipped, no gradient)
      clip_high: A > 0 and rho > 1 + eps_high   (clipped, no gradient)
      dual_clip: A < 0 and rho A < dual_clip A, i.e. the dual clip bound is active
    """
    adv = adv.astype(jnp.float32)
    ratio = jnp.exp(logp.astype(jnp.float32) - old_logp.astype(jnp.float32))
    clipped = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    dual = jnp.minimum(clipped, -dual_clip * adv)
    loss = jnp.where(adv < 0, dual, clipped)
    indicators = {
        "clip_low": ((adv < 0) & (ratio < 1.0 - eps_low)).astype(jnp.float32),
        "clip_high": ((adv > 0) & (ratio > 1.0 + eps_high)).astype(jnp.float32),
        "dual_clip": ((adv < 0) & (clipped > -dual_clip * adv)).astype(jnp.float32),
    }
    return loss, indicators


def kl_penalty(logp, ref_logp, kind: str = "k3", clamp: float = 10.0):
    """Per-token KL(pi || pi_ref) estimate (section 4), log-ratio clamped to [-clamp, clamp].

    With d = log pi - log pi_ref:  k1 = d;  k2 = d^2 / 2;  k3 = exp(-d) + d - 1.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}, expected one of {KL_KINDS}")
    d = jnp.clip(logp.astype(jnp.float32) - ref_logp.astype(jnp.float32), -clamp, clamp)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    return jnp.exp(-d) + d - 1.0
