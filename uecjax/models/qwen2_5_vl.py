"""Qwen2.5-VL: the vision tower (`vision.py`) feeding the Qwen2 decoder (`qwen2.py`) with M-RoPE.

    model = from_pretrained("Qwen2.5-VL-3B-Instruct")            # -> Qwen2_5_VL
    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)

Image tokens (one per merged 2x2 patch block) are replaced by the tower's features. Positions
are three-dimensional (M-RoPE) and depend on where the images are, so `mrope_positions`
computes them on the host. The class offers the Qwen2 API (`embed_tokens`, `hidden_states`
with positions [3, B, T] or [B, T], `logits`, `init_cache`, `output_weight`, ...) and
`embed_rows` (each row its own images), so the sampler and train step run it with little
change; decoding continues each row's positions with its `rope_deltas`. docs/DESIGN.md,
"Vision-language models".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uecjax.models.config import VLConfig
from uecjax.models.qwen2 import KVCache, Qwen2
from uecjax.models.vision import VisionLayout, VisionTower, check_grid, vision_layout


def mrope_positions(input_ids, attention_mask, image_grid_thw, *, image_token_id: int,
                    spatial_merge_size: int, video_token_id: int | None = None):
    """(positions [3, B, T] int32, rope_deltas [B] int32), as transformers' `get_rope_index`.

    input_ids, attention_mask [B, T] (numpy; attention_mask None: all real). Padding gets
    position 0. image_grid_thw [images, 3]: the images in the order their tokens appear, row
    after row. rope_deltas = largest position + 1 - number of real tokens: the shift that
    continues the positions of decoded tokens.
    """
    ids = _host(input_ids, "input_ids")
    B, T = ids.shape
    mask = np.ones((B, T), bool) if attention_mask is None else _host(attention_mask, "attention_mask").astype(bool)
    grids = [] if image_grid_thw is None else [tuple(int(v) for v in g)
                                               for g in np.asarray(image_grid_thw).reshape(-1, 3)]
    if video_token_id is not None and np.any((ids == video_token_id) & mask):
        raise ValueError(f"input_ids hold video tokens (id {video_token_id}); videos are not supported")
    positions = np.zeros((3, B, T), np.int64)
    deltas = np.zeros((B,), np.int64)
    images = iter(enumerate(grids))
    for b in range(B):
        real = ids[b][mask[b]]
        pos = _row_positions(b, real == image_token_id, images, len(grids), spatial_merge_size)
        positions[:, b, mask[b]] = pos
        deltas[b] = (pos.max() + 1 if pos.size else 0) - len(real)
    used = len(grids) - sum(1 for _ in images)
    if used != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} image(s) but input_ids hold image tokens "
                         f"for {used}; every image needs its placeholder tokens in the prompt")
    return positions.astype(np.int32), deltas.astype(np.int32)


def _row_positions(row, is_image, images, num_images, m):
    """Positions [3, n] of one row's real tokens; takes its images' grids from `images`."""
    chunks, start = [], 0
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(is_image)]
    for i, j in zip(bounds[:-1], bounds[1:]):
        if i == j:
            continue
        if not is_image[i]:  # text: all three axes advance together
            chunks.append(np.broadcast_to(np.arange(j - i) + start, (3, j - i)))
            start += j - i
            continue
        k = i  # a run of image tokens: one image, or several back to back
        while k < j:
            index, (t, h, w) = next(images, (None, (0, 0, 0)))
            if index is None:
                raise ValueError(f"row {row} has more image tokens than the {num_images} image(s) in "
                                 "image_grid_thw provide; each image needs t*h*w/merge^2 tokens")
            n = t * (h // m) * (w // m)
            if k + n > j:
                raise ValueError(
                    f"row {row}: image {index} (grid {t}x{h}x{w}) needs {n} image tokens but its run "
                    f"has {j - k}; the prompt's image placeholders must match the processor's image_grid_thw")
            # The image's tokens take (t, h, w) grid coordinates, offset by the text before it;
            # the text after it resumes at the largest position + 1.
            grid = np.meshgrid(np.arange(t), np.arange(h // m), np.arange(w // m), indexing="ij")
            chunks.append(np.stack(grid).reshape(3, -1) + start)
            start += max(h, w) // m
            k += n
    return np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)


def _host(x, name):
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{name} must be concrete to compute M-RoPE positions on the host; under jit, "
                         "compute them outside with mrope_positions(...) and pass position_ids") from None


def mrope_tables(positions, inv_freq, section, attention_factor: float = 1.0):
    """cos, sin [B, T, head_dim] for positions [3, B, T]: the frequencies are split into
    `section` chunks, chunk i driven by the temporal / height / width positions (i % 3)."""
    axis_of_freq = np.concatenate([np.full(n, i % 3) for i, n in enumerate(section)])
    per_freq = jnp.moveaxis(positions[axis_of_freq], 0, -1).astype(jnp.float32)  # [B, T, hd/2]
    angles = per_freq * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


class Qwen2_5_VL(nnx.Module):
    """Qwen2.5-VL conditional generation: `model(input_ids, ...)` gives float32 logits [B, T, V]."""

    def __init__(self, config: VLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.language_model = Qwen2(config.text, rngs=rngs)
        self.visual = VisionTower(config.vision, rngs=rngs)

    # -- host-side inputs ---------------------------------------------------------------------
    def vision_layout(self, image_grid_thw) -> VisionLayout:
        return vision_layout(image_grid_thw, self.config.vision)

    def position_ids(self, input_ids, attention_mask=None, image_grid_thw=None):
        """(M-RoPE positions [3, B, T], rope_deltas [B]) on the host; see `mrope_positions`."""
        cfg = self.config
        return mrope_positions(input_ids, attention_mask, image_grid_thw,
                               image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                               spatial_merge_size=cfg.vision.spatial_merge_size)

    # -- the Qwen2 API --------------------------------------------------------------------------
    def embed_tokens(self, input_ids):
        return self.language_model.embed_tokens(input_ids)

    def output_weight(self):
        return self.language_model.output_weight()

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def init_cache(self, batch: int, num_slots: int, dtype=None) -> KVCache:
        return self.language_model.init_cache(batch, num_slots, dtype)

    def layer_list(self):
        return self.language_model.layer_list()

    def rope(self, positions):
        """M-RoPE cos, sin [B, T, head_dim] for positions [3, B, T] or [B, T] (all axes equal)."""
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
        lm = self.language_model
        return mrope_tables(positions, np.asarray(lm.rope_inv_freq, np.float32),
                            self.config.mrope_section, lm.rope_attention_factor)

    def hidden_states(self, x, positions, key_mask, *, cache: KVCache | None = None, cache_index=0,
                      rope=None, layers=None, segment_ids=None, dropout_key=None):
        """Qwen2.hidden_states with M-RoPE positions [3, B, T] (or [B, T])."""
        return self.language_model.hidden_states(
            x, positions, key_mask, cache=cache, cache_index=cache_index,
            rope=self.rope(positions) if rope is None else rope, layers=layers,
            segment_ids=segment_ids, dropout_key=dropout_key)

    # -- images -------------------------------------------------------------------------------
    def image_features(self, pixel_values, image_grid_thw):
        """Merged features [image tokens, hidden] of all images, image after image.

        image_grid_thw: [images, 3] numpy, or its `vision_layout` (needed under jit).
        """
        return self.visual(jnp.asarray(pixel_values), self._layout(image_grid_thw))

    def _layout(self, image_grid_thw) -> VisionLayout:
        if image_grid_thw is None:
            raise ValueError("pixel_values need their image_grid_thw (the processor returns both)")
        if isinstance(image_grid_thw, VisionLayout):
            return image_grid_thw
        return self.vision_layout(image_grid_thw)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings [B, T, H] with the image features in the image tokens' places."""
        x = self.embed_tokens(input_ids)
        if pixel_values is None:
            return x
        layout = self._layout(image_grid_thw)
        is_image = (input_ids == self.config.image_token_id).reshape(-1)
        _check_image_token_count(is_image, layout.merged_order.shape[0], self.config.image_token_id)
        features = self.image_features(pixel_values, layout).astype(x.dtype)
        # The k-th image token (row-major over the batch) takes the k-th feature.
        which = jnp.clip(jnp.cumsum(is_image) - 1, 0, features.shape[0] - 1)
        flat = jnp.where(is_image[:, None], features[which], x.reshape(-1, x.shape[-1]))
        return flat.reshape(x.shape)

    def embed_rows(self, input_ids, pixel_values, layouts: VisionLayout, prompt_len: int | None = None):
        """Token embeddings [B, T, H] where every row brings its own images: pixel_values
        [B, N, patch_dim] and layouts with a leading B axis, each row's padded to N patches
        (`padded_vision_layout`). Row b's k-th image token takes its k-th merged feature, so
        the rows of a batch are independent: they shard and split into micro-batches as text
        rows do. Jittable: the shapes depend on N only. prompt_len: only the first prompt_len
        columns hold images; image tokens after them (sampled ones) are embedded as text."""
        x = self.embed_tokens(input_ids)
        features = jax.vmap(self.visual)(pixel_values, layouts).astype(x.dtype)  # [B, N/m^2, H]
        is_image = input_ids == self.config.image_token_id
        if prompt_len is not None:
            is_image &= jnp.arange(input_ids.shape[1]) < prompt_len
        which = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        picked = jnp.take_along_axis(features, which[..., None], axis=1)
        return jnp.where(is_image[..., None], picked, x)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 position_ids=None):
        """Logits [B, T, V] float32 (training / scoring, no cache).

        attention_mask [B, T]: 1 on real tokens, 0 on (left) padding; default all real.
        position_ids: [3, B, T] (or [B, T] for text); default `position_ids(...)` on the host,
        which needs concrete input_ids: under jit, pass them (and a `vision_layout`).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if position_ids is None:
            grid = image_grid_thw
            if isinstance(grid, VisionLayout):
                raise ValueError("with a precomputed vision_layout, pass position_ids too "
                                 "(model.position_ids(input_ids, attention_mask, image_grid_thw))")
            grid = None if grid is None else check_grid(grid, self.config.vision)
            position_ids = jnp.asarray(self.position_ids(input_ids, attention_mask, grid)[0])
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        hidden, _ = self.hidden_states(x, position_ids, attention_mask)
        return self.logits(hidden)


def _check_image_token_count(is_image, num_features: int, image_token_id: int):
    """Image tokens must match the features one to one (checked when input_ids are concrete)."""
    try:
        count = int(np.asarray(is_image).sum())
    except jax.errors.TracerArrayConversionError:
        return  # under jit; mrope_positions checks the same counts on the host
    if count != num_features:
        raise ValueError(
            f"input_ids hold {count} image tokens (id {image_token_id}) but the images give "
            f"{num_features} features; each image needs t*h*w/merge^2 placeholder tokens: build "
            "the prompt with the processor that produced pixel_values and image_grid_thw")
