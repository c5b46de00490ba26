"""Rotary position embeddings: inverse frequencies for the rope types Qwen checkpoints use.

The frequencies are computed once on the host in float32, exactly as transformers'
`ROPE_INIT_FUNCTIONS` do, so logits match theirs; `apply_rope` rotates in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float, rope: dict, max_position_embeddings: int):
    """Returns (inv_freq [head_dim // 2] float32, attention_factor) for a rope config dict."""
    rope_type = rope.get("rope_type", "default")
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    base = np.float32(theta) ** exponents
    inv_freq = (1.0 / base).astype(np.float32)
    if rope_type in ("default", "mrope"):
        return inv_freq, 1.0
    if rope_type == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, base, rope, max_position_embeddings)
    raise ValueError(f"rope_type {rope_type!r} is not supported")


def _llama3(inv_freq, rope):
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(dim, theta, pos_freqs, rope, max_position_embeddings):
    original = rope.get("original_max_position_embeddings") or max_position_embeddings
    factor = rope.get("factor") or max_position_embeddings / original

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(positions, inv_freq, attention_factor: float = 1.0):
    """cos, sin [..., T, head_dim] float32 for integer positions [..., T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x, cos, sin):
    """Rotates x [B, T, heads, head_dim] by (cos, sin) [B, T, head_dim] (rotate-half layout)."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
