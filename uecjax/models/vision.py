"""The Qwen2.5-VL vision tower in flax.nnx, and the host-side layout of its patch sequence.

Images of different sizes are concatenated into one patch sequence. Which patches attend to
which depends only on the image grids, so it is computed on the host in numpy (`vision_layout`:
window order, variable-length segments) and passed to the jitted tower as index arrays of
static shape; attention runs over padded segments with a same-segment mask, so memory grows
with the segments' sizes, not with the square of the sequence. `padded_vision_layout` lays out
one prompt's images padded to a fixed number of patches, for jitted callers that must not
recompile per image size (the sampler, the train step). Weights are stored input-major
(`x @ w`); `hf.py` maps them to and from the HF names. docs/DESIGN.md, "Vision-language models".
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uecjax.models.config import VisionConfig
from uecjax.models.attention import attention, segment_mask
from uecjax.models.qwen2 import linear_axes, rms_norm

VISION_NORM_EPS = 1e-6  # hard-coded in transformers' vision blocks and merger

# Logical axes of the vision parameters (see uecjax.parallel.mesh.LOGICAL_RULES): "layers" is the
# stacked block axis; the hidden axes split over fsdp, heads and MLP stay whole.
BLOCK_PARAM_AXES = {
    "norm1": ("layers", "norm"),
    **linear_axes("qkv", "vision_embed", "vision_heads"),
    **linear_axes("proj", "vision_heads", "vision_embed"),
    "norm2": ("layers", "norm"),
    **linear_axes("gate", "vision_embed", "vision_mlp"),
    **linear_axes("up", "vision_embed", "vision_mlp"),
    **linear_axes("down", "vision_mlp", "vision_embed"),
}
TOWER_PARAM_AXES = {
    "patch_w": ("vision_patch", "vision_embed"),
    "merger_norm": ("norm",),
    **linear_axes("merger_fc1", "vision_merge", "vision_merge", stacked=False),
    **linear_axes("merger_fc2", "vision_merge", "embed", stacked=False),
}

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


# ---- host-side layout ---------------------------------------------------------------------

class Segments(NamedTuple):
    """Contiguous segments of a sequence of N, laid out in a [S, L] batch of rows.

    gather [S, L]: sequence index of each slot (0 in empty slots); segment_ids [S, L]: the
    segment of each slot (-1 in empty slots), slots attend within their segment; scatter [N]:
    each sequence position's flat slot s * L + j, to undo the gather.
    """

    gather: np.ndarray
    segment_ids: np.ndarray
    scatter: np.ndarray


class VisionLayout(NamedTuple):
    """Index arrays for one batch of image grids; a pytree, so it passes through jit."""

    patch_order: np.ndarray  # [N] patches in window order: x_window = x[patch_order]
    rotary_pos: np.ndarray  # [N, 2] (row, column) of each patch, window order
    windows: Segments  # attention segments of the windowed blocks
    frames: Segments  # attention segments of the full-attention blocks
    merged_order: np.ndarray  # [N / merge^2] merged tokens from window order back to image order


def segments(cu_seqlens) -> Segments:
    """Segments from cumulative lengths [0, l0, l0 + l1, ...]; empty segments are dropped."""
    cu = np.unique(np.asarray(cu_seqlens, np.int64))  # unique: drops empty segments
    starts, lengths = cu[:-1], np.diff(cu)
    longest = int(lengths.max())
    offsets = np.arange(longest)
    valid = offsets[None, :] < lengths[:, None]
    gather = np.where(valid, starts[:, None] + offsets[None, :], 0)
    seg_of = np.repeat(np.arange(len(lengths)), lengths)
    scatter = seg_of * longest + (np.arange(cu[-1]) - starts[seg_of])
    ids = np.where(valid, np.arange(len(lengths))[:, None], -1)
    return Segments(gather.astype(np.int32), ids.astype(np.int32), scatter.astype(np.int32))


def packed_segments(lengths, row_len: int, num_rows: int) -> Segments:
    """Consecutive segments of the given lengths (in sequence order), packed next-fit into
    num_rows rows of row_len slots: a segment joins the current row if it fits, else opens the
    next one. The shape [num_rows, row_len] is fixed by the caller, not by the lengths."""
    gather = np.zeros((num_rows, row_len), np.int32)
    ids = np.full((num_rows, row_len), -1, np.int32)
    scatter = np.zeros((int(np.sum(lengths)),), np.int32)
    row, col, start = 0, 0, 0
    for k, n in enumerate(int(n) for n in lengths):
        if n > row_len:
            raise ValueError(f"a segment of {n} patches does not fit rows of {row_len}")
        if col + n > row_len:
            row, col = row + 1, 0
        if row >= num_rows:
            raise ValueError(f"segments {list(lengths)} do not fit {num_rows} rows of {row_len}")
        gather[row, col:col + n] = np.arange(start, start + n)
        ids[row, col:col + n] = k
        scatter[start:start + n] = row * row_len + col + np.arange(n)
        col, start = col + n, start + n
    return Segments(gather, ids, scatter)


def check_grid(grid_thw, cfg: VisionConfig) -> np.ndarray:
    """image_grid_thw as an [images, 3] int array, validated against the merge size."""
    try:
        grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    except jax.errors.TracerArrayConversionError:
        raise ValueError("image_grid_thw must be concrete (numpy) to lay out the patches; under jit, "
                         "build the layout outside with vision_layout(grid, config.vision) and "
                         "pass that instead") from None
    m = cfg.spatial_merge_size
    bad = [tuple(g) for g in grid if g[0] < 1 or g[1] % m or g[2] % m or g[1] < 1 or g[2] < 1]
    if bad:
        raise ValueError(f"image_grid_thw rows {bad}: heights and widths (in patches) must be "
                         f"positive multiples of spatial_merge_size={m}, as the image processor makes them")
    return grid


def rotary_positions(grid, merge: int) -> np.ndarray:
    """(row, column) of every patch [N, 2], ordered merge-block-major as the processor flattens
    patches (transformers' `get_vision_position_ids`); frames repeat the same positions."""
    out = []
    for t, h, w in grid:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out)


def window_index(merged_grid, window_merged: int):
    """(merged-token order by window, cumulative window lengths in merged tokens), as
    transformers' `get_vision_window_index`: each frame's grid of merged tokens is padded up to
    whole windows of window_merged x window_merged, read window by window, padding dropped."""
    order, cu, offset = [], [0], 0
    for t, gh, gw in merged_grid:
        pad_h, pad_w = window_merged - gh % window_merged, window_merged - gw % window_merged
        nh, nw = (gh + pad_h) // window_merged, (gw + pad_w) // window_merged
        index = np.full((t, gh + pad_h, gw + pad_w), -1)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        index = index.reshape(t, nh, window_merged, nw, window_merged).transpose(0, 1, 3, 2, 4)
        index = index.reshape(t, nh * nw, window_merged * window_merged)
        cu.extend((cu[-1] + np.cumsum((index >= 0).sum(-1).reshape(-1))).tolist())
        index = index.reshape(-1)
        order.append(index[index >= 0] + offset)
        offset += t * gh * gw
    return np.concatenate(order), np.asarray(cu)


def vision_layout(image_grid_thw, cfg: VisionConfig) -> VisionLayout:
    """The index arrays for a batch of image grids [images, 3] (t, h, w in patches)."""
    grid = check_grid(image_grid_thw, cfg)
    m = cfg.spatial_merge_size
    unit = m * m
    merged_grid = grid // np.array([1, m, m])
    order, cu_windows = window_index(merged_grid, cfg.window_size // m // cfg.patch_size)
    patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
    positions = rotary_positions(grid, m)
    frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return VisionLayout(
        patch_order=patch_order.astype(np.int32),
        rotary_pos=positions[patch_order].astype(np.int32),
        windows=segments(cu_windows * unit),
        frames=segments(np.concatenate([[0], np.cumsum(frame_lengths)])),
        merged_order=np.argsort(order).astype(np.int32),
    )


def window_patches(cfg: VisionConfig) -> int:
    """Patches in a full attention window (the longest a window can be)."""
    return (cfg.window_size // cfg.patch_size) ** 2


def window_rows(num_patches: int, cfg: VisionConfig) -> int:
    """Rows that next-fit packing of any windows totalling num_patches needs at most: two
    consecutive rows always hold more than one row's worth, else the second's first window
    would have joined the first."""
    return 2 * -(-num_patches // window_patches(cfg)) + 1


def padded_vision_layout(image_grid_thw, cfg: VisionConfig, num_patches: int) -> VisionLayout:
    """The layout of one prompt's images (none is fine) padded to num_patches patches.

    Array shapes depend on num_patches (and cfg) only, so prompts with different images stack
    into one batch and a jitted tower sees the same shapes. The real patches come first, in
    the order `vision_layout` gives them; padding patches (their pixel values are ignored)
    follow, attend among themselves, and their merged features come last in `merged_order`.
    Windows (at most `window_patches` each) are packed next-fit into `window_rows` rows; all
    frames share one row of num_patches slots, attending within their own frame.
    """
    unit = cfg.spatial_merge_size**2
    grid = check_grid(np.zeros((0, 3)) if image_grid_thw is None else image_grid_thw, cfg)
    real = int(grid.prod(axis=1).sum())
    if num_patches % unit or num_patches < real:
        raise ValueError(f"num_patches={num_patches} must be a multiple of {unit} and hold the "
                         f"{real} patches of images {grid.tolist()}")
    pad = num_patches - real
    window = window_patches(cfg)
    pad_windows = [window] * (pad // window) + ([pad % window] if pad % window else [])
    if real:
        base = vision_layout(grid, cfg)
        m = cfg.spatial_merge_size
        _, cu = window_index(grid // np.array([1, m, m]), cfg.window_size // m // cfg.patch_size)
        window_lengths = (np.diff(np.unique(cu)) * unit).tolist()  # empty windows dropped
        frame_lengths = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]).tolist()
        order, rotary, merged = base.patch_order, base.rotary_pos, base.merged_order
    else:
        window_lengths, frame_lengths = [], []
        order, rotary, merged = np.zeros((0,), np.int32), np.zeros((0, 2), np.int32), np.zeros((0,), np.int32)
    return VisionLayout(
        patch_order=np.concatenate([order, np.arange(real, num_patches)]).astype(np.int32),
        rotary_pos=np.concatenate([rotary, np.zeros((pad, 2), np.int32)]).astype(np.int32),
        windows=packed_segments([*window_lengths, *pad_windows], window, window_rows(num_patches, cfg)),
        frames=packed_segments([*frame_lengths, *([pad] if pad else [])], num_patches, 1),
        merged_order=np.concatenate([merged, np.arange(real // unit, num_patches // unit)]).astype(np.int32),
    )


# ---- the tower ------------------------------------------------------------------------------

def _init(name, shape, dtype, rngs):
    if "norm" in name:
        return jnp.ones(shape, dtype)
    if name.endswith("_b"):
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class VisionBlocks(nnx.Module):
    """All vision blocks' weights, stacked on a leading axis of size depth."""

    def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
        D, H, I = cfg.depth, cfg.hidden_size, cfg.intermediate_size
        shapes = {
            "norm1": (D, H), "qkv_w": (D, H, 3 * H), "qkv_b": (D, 3 * H), "proj_w": (D, H, H),
            "proj_b": (D, H), "norm2": (D, H), "gate_w": (D, H, I), "gate_b": (D, I),
            "up_w": (D, H, I), "up_b": (D, I), "down_w": (D, I, H), "down_b": (D, H),
        }
        for name, shape in shapes.items():
            setattr(self, name, nnx.Param(_init(name, shape, cfg.weight_dtype, rngs)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in BLOCK_PARAM_AXES}


def rotary_tables(rotary_pos, head_dim: int, theta: float):
    """cos, sin [N, head_dim] float32: the first half of each head's frequencies turns with the
    patch row, the second with the column (transformers' axial vision rope)."""
    quarter = np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2)
    inv_freq = jnp.asarray((1.0 / np.float32(theta) ** quarter).astype(np.float32))
    angles = rotary_pos.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim / 4]
    angles = angles.reshape(angles.shape[0], -1)  # rows' then columns' frequencies
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, cos, sin):
    """Rotate-half rope on x [N, heads, head_dim] in float32."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def segment_attention(q, k, v, seg: Segments, implementation: str = "xla"):
    """Attention within each segment for q, k, v [N, heads, head_dim]; returns [N, heads, head_dim].
    Slots attend within their segment; empty slots (-1) only to each other, and are dropped."""
    S, L = seg.gather.shape
    _, H, D = q.shape
    rows = lambda x: x[seg.gather]  # noqa: E731  [N, H, D] -> [S, L, H, D]
    heads_first = lambda x: rows(x).transpose(0, 2, 1, 3)  # noqa: E731  the KV layout
    out = attention(rows(q), heads_first(k), heads_first(v), segment_mask(seg.segment_ids),
                    implementation)
    return out.reshape(S * L, H, D)[seg.scatter]


def _block(cfg: VisionConfig, p, x, cos, sin, seg: Segments):
    dt = cfg.compute_dtype
    N, H = x.shape
    h = rms_norm(x, p["norm1"], VISION_NORM_EPS)
    qkv = (h @ p["qkv_w"].astype(dt) + p["qkv_b"].astype(dt)).reshape(N, 3, cfg.num_heads, -1)
    q, k, v = _rotate(qkv[:, 0], cos, sin), _rotate(qkv[:, 1], cos, sin), qkv[:, 2]
    attn = segment_attention(q, k, v, seg, cfg.attention).reshape(N, H)
    x = x + attn @ p["proj_w"].astype(dt) + p["proj_b"].astype(dt)
    h = rms_norm(x, p["norm2"], VISION_NORM_EPS)
    gate = ACTIVATIONS[cfg.hidden_act](h @ p["gate_w"].astype(dt) + p["gate_b"].astype(dt))
    up = h @ p["up_w"].astype(dt) + p["up_b"].astype(dt)
    return x + (gate * up) @ p["down_w"].astype(dt) + p["down_b"].astype(dt)


class VisionTower(nnx.Module):
    """Patches [N, patch_dim] of images laid out by `vision_layout` -> merged image features
    [N / merge^2, out_hidden_size], image after image, in the order the image tokens take them."""

    def __init__(self, config: VisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        H, unit = config.hidden_size, config.spatial_merge_size**2
        dtype = config.weight_dtype
        self.patch_w = nnx.Param(_init("patch_w", (config.patch_dim, H), dtype, rngs))
        self.blocks = VisionBlocks(config, rngs)
        self.merger_norm = nnx.Param(jnp.ones((H,), dtype))
        self.merger_fc1_w = nnx.Param(_init("merger_fc1_w", (H * unit, H * unit), dtype, rngs))
        self.merger_fc1_b = nnx.Param(jnp.zeros((H * unit,), dtype))
        self.merger_fc2_w = nnx.Param(_init("merger_fc2_w", (H * unit, config.out_hidden_size), dtype, rngs))
        self.merger_fc2_b = nnx.Param(jnp.zeros((config.out_hidden_size,), dtype))

    def __call__(self, pixel_values, layout: VisionLayout):
        cfg = self.config
        dt = cfg.compute_dtype
        N = layout.patch_order.shape[0]
        if pixel_values.shape != (N, cfg.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, but the image grids hold {N} "
                f"patches of {cfg.patch_dim} values (channels x temporal_patch_size x patch_size^2); "
                "pass the processor's pixel_values with its image_grid_thw")
        # The patch embedding is a Conv3d whose stride equals its kernel: a matmul per patch.
        x = pixel_values.astype(dt)[layout.patch_order] @ self.patch_w[...].astype(dt)
        cos, sin = rotary_tables(layout.rotary_pos, cfg.head_dim, cfg.rope_theta)
        is_full = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)

        def body(x, block_in):
            p, full = block_in
            x = jax.lax.cond(full, lambda x: _block(cfg, p, x, cos, sin, layout.frames),
                             lambda x: _block(cfg, p, x, cos, sin, layout.windows), x)
            return x, None

        if cfg.remat != "none":
            body = jax.checkpoint(body, prevent_cse=False)
        x, _ = jax.lax.scan(body, x, (self.blocks.arrays(), jnp.asarray(is_full)))

        # Merger: each merge^2 consecutive patches (one 2x2 block) become one token.
        h = rms_norm(x, self.merger_norm[...], VISION_NORM_EPS).reshape(N // cfg.spatial_merge_size**2, -1)
        h = jax.nn.gelu(h @ self.merger_fc1_w[...].astype(dt) + self.merger_fc1_b[...].astype(dt),
                        approximate=False)
        h = h @ self.merger_fc2_w[...].astype(dt) + self.merger_fc2_b[...].astype(dt)
        return h[layout.merged_order]


def num_image_tokens(grid, cfg: VisionConfig) -> np.ndarray:
    """Merged tokens (image-token placeholders) per image: t * h * w / merge^2."""
    grid = check_grid(grid, cfg)
    return grid.prod(axis=1) // cfg.spatial_merge_size**2


__all__ = ["VisionTower", "VisionLayout", "Segments", "vision_layout", "padded_vision_layout",
           "num_image_tokens"]
