"""Clipped PPO policy loss (token and sequence ratios) and KL estimators (ALGORITHMS.md 4, 4a)."""

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence", "sequence_token")


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


def gspo_clip_loss(logp, old_logp, adv, mask, *, eps_low: float = 3e-4, eps_high: float = 4e-4,
                   token_grad: bool = False):
    """Per-token GSPO loss with the sequence ratio (arXiv 2507.18071, section 4a); inputs [B, T].

    s_i = exp(mean over the valid tokens of (log pi - log pi_old)); A_i = the sequence's mean
    token advantage (A_i itself for broadcast advantages). token_grad=False (GSPO):
        l_{i,t} = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)  on every token,
    differentiable through s_i. token_grad=True (GSPO-token): s_{i,t} = sg(s_i) pi_t / sg(pi_t)
    has the value s_i and the gradient of one token, and the token advantages A_{i,t} are used:
        l_{i,t} = -min(s_{i,t} A_{i,t}, clip(s_{i,t}) A_{i,t}).
    With broadcast advantages and seq-mean-token-mean both give the same gradient.
    No dual clip: GSPO's objective and verl's compute_policy_loss_gspo have none, and a
    geometric-mean ratio past c = 3 is far outside any trust region of eps ~ 1e-4.

    Returns (loss [B, T] f32, token indicators like `ppo_clip_loss`, sequence indicators [B]
    f32 0/1: seq_clip_low (A_i < 0, s_i < 1 - eps_low), seq_clip_high (A_i > 0, s_i > 1 + eps_high),
    seq_valid (the row has a valid token)).
    """
    m = mask.astype(jnp.float32)
    logp, adv = logp.astype(jnp.float32), adv.astype(jnp.float32)
    n_i = jnp.maximum(m.sum(axis=-1), 1.0)
    # where, not *: whatever lies off the mask (padding log-probs) must not reach s_i
    seq_log_ratio = jnp.sum(jnp.where(m > 0, logp - old_logp.astype(jnp.float32), 0.0), axis=-1) / n_i
    seq_adv = jnp.sum(jnp.where(m > 0, adv, 0.0), axis=-1) / n_i
    if token_grad:
        log_ratio = jax.lax.stop_gradient(seq_log_ratio)[:, None] + logp - jax.lax.stop_gradient(logp)
        a = adv
    else:
        log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], m.shape)
        a = jnp.broadcast_to(seq_adv[:, None], m.shape)
    ratio = jnp.exp(log_ratio)
    loss = jnp.maximum(-a * ratio, -a * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    s = jnp.exp(seq_log_ratio)
    seq = {
        "seq_clip_low": ((seq_adv < 0) & (s < 1.0 - eps_low)).astype(jnp.float32),
        "seq_clip_high": ((seq_adv > 0) & (s > 1.0 + eps_high)).astype(jnp.float32),
        "seq_valid": (m.sum(axis=-1) > 0).astype(jnp.float32),
    }
    ratio = jax.lax.stop_gradient(ratio)
    indicators = {
        "clip_low": ((a < 0) & (ratio < 1.0 - eps_low)).astype(jnp.float32),
        "clip_high": ((a > 0) & (ratio > 1.0 + eps_high)).astype(jnp.float32),
        "dual_clip": jnp.zeros_like(m),
    }
    return loss, indicators, seq


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
