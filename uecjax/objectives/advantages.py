"""Sequence advantages and advantage/reward shaping (ALGORITHMS.md sections 2 and 7)."""

import jax
import jax.numpy as jnp

ADVANTAGE_KINDS = ("grpo", "drgrpo", "rloo")


def group_advantages(rewards, group_size: int, kind: str = "grpo", eps: float = 1e-6):
    """Per-response advantages from the rewards of its group (section 2).

    rewards: [P * G] (groups contiguous) or [P, G]; returns float32 of the same shape.
      grpo:   (r - mean_G r) / (std_G r + eps), std with ddof=1
      drgrpo: r - mean_G r
      rloo:   r - mean_{j != i} r_j
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}, expected one of {ADVANTAGE_KINDS}")
    if kind != "drgrpo" and group_size < 2:
        raise ValueError(f"{kind} needs group_size >= 2, got {group_size}")
    r = jnp.asarray(rewards, jnp.float32)
    g = r.reshape(-1, group_size)
    mean = g.mean(axis=-1, keepdims=True)
    if kind == "grpo":
        adv = (g - mean) / (g.std(axis=-1, ddof=1, keepdims=True) + eps)
    elif kind == "drgrpo":
        adv = g - mean
    else:  # rloo: r_i - (S - r_i) / (G - 1) == G / (G - 1) * (r_i - S / G)
        adv = (g - mean) * (group_size / (group_size - 1))
    return adv.reshape(r.shape)


def broadcast_to_tokens(seq_values, mask):
    """Broadcast one value per sequence [B] to its tokens [B, T], zero off the mask (section 2)."""
    return jnp.asarray(seq_values, jnp.float32)[:, None] * mask.astype(jnp.float32)


def entropy_advantage(adv, entropy, a: float = 0.4, k: float = 2.0):
    """Entropy-shaped advantage, arXiv 2506.14758 (section 7, `entropy_adv`).

    A_{i,t} + min(a * stopgrad(H_{i,t}), |A_{i,t}| / k); adv and entropy are [B, T].
    """
    adv = adv.astype(jnp.float32)
    bonus = a * jax.lax.stop_gradient(entropy.astype(jnp.float32))
    return adv + jnp.minimum(bonus, jnp.abs(adv) / k)


def overlong_penalty(lengths, max_len: int, cache_len: int, factor: float = 1.0):
    """DAPO soft overlong punishment on response token length (section 7, `dapo`).

    Added to the reward. With L = max_len (the generation limit) and C = cache_len (the soft
    zone before it):  0 if len <= L - C;  -factor * (len - (L - C)) / C if L - C < len <= L;
    -factor if len > L. lengths: any shape, integer or float; returns float32.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got {cache_len}, {max_len}")
    lengths = jnp.asarray(lengths, jnp.float32)
    excess = (lengths - (max_len - cache_len)) / cache_len
    return -factor * jnp.clip(excess, 0.0, 1.0)
