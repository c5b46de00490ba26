"""Success rates, UEC-RL gated exploration + stabilizer, and AER (ALGORITHMS.md sections 5, 6, 9)."""

import jax
import jax.numpy as jnp
import numpy as np

from uecjax.objectives.aggregation import aggregate

GATE_KINDS = ("hard", "linear", "sigmoid")


# ---- success rate p_q (difficulty, section 5), host side ----

def success_rate(acc) -> np.ndarray:
    """p_q = mean_i acc_i per prompt, from the accuracy component acc [P, G] (section 5). Host, numpy."""
    return np.asarray(acc, np.float32).mean(axis=-1)


def per_sequence(values, group_size: int) -> np.ndarray:
    """Repeat one value per prompt [P] to one per sequence [P * G], groups contiguous (section 5)."""
    return np.repeat(np.asarray(values, np.float32), group_size, axis=0)


def is_hard(p, tau_hard: float = 0.0):
    """1.0 where the prompt is hard, p_q <= tau_hard (section 5); float32."""
    return (jnp.asarray(p, jnp.float32) <= tau_hard).astype(jnp.float32)


# ---- UEC-RL (section 6) ----

def gate_weight(p, kind: str = "linear", tau: float = 0.5, s: float = 0.1):
    """Exploration weight w_q from the success rate p_q (section 6); float32, same shape as p.

    hard: 1[p <= tau];  linear: clip(1 - p / tau, 0, 1);  sigmoid: sigmoid((tau - p) / s).
    """
    if kind not in GATE_KINDS:
        raise ValueError(f"unknown gate kind {kind!r}, expected one of {GATE_KINDS}")
    p = jnp.asarray(p, jnp.float32)
    if kind == "hard":
        return (p <= tau).astype(jnp.float32)
    if kind == "linear":
        if isinstance(tau, (int, float)) and tau <= 0:  # a traced tau is checked by its caller
            raise ValueError(f"linear gate needs tau > 0, got {tau}")
        return jnp.clip(1.0 - p / tau, 0.0, 1.0)
    return jax.nn.sigmoid((tau - p) / s)


def exploration_loss(entropy, mask, seq_weight, alpha, mode: str = "token-mean", **agg_kwargs):
    """-alpha * agg(w_{q(i)} * H_{i,t}): gated entropy bonus as a loss (sections 6, 7, 9).

    entropy, mask [B, T]; seq_weight [B] (UEC gate, AER allocation, or ones for `entropy_reg`);
    alpha a float or traced scalar; mode and agg_kwargs as in `aggregate`.
    """
    weighted = jnp.asarray(seq_weight, jnp.float32)[:, None] * entropy.astype(jnp.float32)
    return -alpha * aggregate(weighted, mask, mode, **agg_kwargs)


def stabilizer_penalty(mean_entropy, h0, kappa: float = 1.0, lam: float = 1.0):
    """lam * relu(Hbar - kappa * H_0)^2 on the token-mean entropy Hbar (section 6).

    Differentiable in mean_entropy; H_0 is a constant (stop_gradient). Zero gradient while
    Hbar <= H_max = kappa * H_0, and above it the gradient pushes the entropy down.
    """
    h_max = kappa * jax.lax.stop_gradient(jnp.asarray(h0, jnp.float32))
    return lam * jnp.square(jax.nn.relu(jnp.asarray(mean_entropy, jnp.float32) - h_max))


# ---- AER (section 9) ----

def aer_allocation(p, kind: str = "hard", tau: float = 0.4):
    """Difficulty-aware coefficient lambda_q: 1[p_q <= tau] (hard) or the linear gate (section 9)."""
    if kind not in ("hard", "linear"):
        raise ValueError(f"AER allocation is 'hard' or 'linear', got {kind!r}")
    return gate_weight(p, kind, tau)


def aer_target(h0, rho: float = 0.6):
    """Initial-anchored target entropy H* = rho * H_0 (section 9)."""
    return rho * h0


def aer_update(alpha: float, mean_entropy: float, h_star: float, eta: float = 0.01,
               alpha_max: float = 0.1) -> float:
    """Host-side update alpha <- clip(alpha + eta * (H* - Hbar), 0, alpha_max) (section 9)."""
    return float(np.clip(alpha + eta * (h_star - float(mean_entropy)), 0.0, alpha_max))
