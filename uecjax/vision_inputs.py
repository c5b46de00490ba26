"""Vision inputs for Qwen2.5-VL: images to patches, prompts with their image tokens, and the
fixed-shape per-row arrays that the jitted sampler and train step take.

    processor = load_image_processor(model_dir, model.config.vision, min_pixels=262144,
                                     max_pixels=4194304)
    images = processor(record.images)                      # PromptImages: patches + grids
    ids = render_vl_prompt(tokenizer, record.prompt, images, merge_size=2)
    out = sampler([ids], params, images=[images])

Images go through transformers' Qwen2-VL image processor (PIL backend, pixel count in
[min_pixels, max_pixels]); each `<|image_pad|>` of the chat template is expanded to one token
per merged patch block. Every row carries its own images padded to a patch bucket
(`patch_buckets`), so the jitted prefill and train step compile once per bucket and rows stay
independent. docs/DESIGN.md, "Vision-language models".
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import NamedTuple, Sequence

import jax
import numpy as np

from uecjax.models.config import VisionConfig, VLConfig
from uecjax.models.qwen2_5_vl import mrope_positions
from uecjax.models.vision import VisionLayout, check_grid, padded_vision_layout
from uecjax.tokenizer import PROMPT_TEMPLATES, render_prompt

IMAGE_PLACEHOLDER = "<image>"  # in dataset prompts (Geometry3K)
IMAGE_PAD = "<|image_pad|>"  # what the chat template writes per image, expanded here
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# Patches per row; multiples of the merge unit (4). min_pixels 262144 gives about 1340
# patches per image, max_pixels 4194304 about 21400.
DEFAULT_PATCH_BUCKETS = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192,
                         12288, 16384, 24576, 32768)
# The common Qwen2.5-VL GRPO recipe (EasyR1): images between 512^2 and 2048^2 pixels.
DEFAULT_MIN_PIXELS = 262144
DEFAULT_MAX_PIXELS = 4194304


class VisionInputError(ValueError):
    """A processor, tokenizer or chat template that cannot place images; the message says
    what to fix."""


class ImageError(VisionInputError):
    """One record's images cannot be used (they fail to preprocess, or do not match its
    placeholders): the record is skipped and counted, the run goes on."""


@dataclasses.dataclass(frozen=True)
class PromptImages:
    """One prompt's images as the vision tower takes them."""

    pixel_values: np.ndarray  # [patches, channels * temporal_patch * patch^2] float32
    grid_thw: np.ndarray  # [images, 3] int32: (t, h, w) of each image in patches

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values.shape[0])

    def tokens_per_image(self, merge_size: int) -> list[int]:
        return [int(n) for n in self.grid_thw.prod(axis=1) // merge_size**2]


# ---- images -> patches ------------------------------------------------------------------------

class ImageProcessor:
    """transformers' Qwen2-VL image processor, checked against the model's vision config."""

    def __init__(self, hf_processor, vision: VisionConfig):
        mismatched = {k: (getattr(hf_processor, k, None), want) for k, want in (
            ("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
            ("merge_size", vision.spatial_merge_size)) if getattr(hf_processor, k, None) != want}
        if mismatched:
            raise VisionInputError(
                "the image processor does not match the model's vision_config (processor, model): "
                f"{mismatched}; use the preprocessor_config.json of the same checkpoint")
        self.hf = hf_processor
        self.vision = vision

    def __call__(self, images: Sequence) -> PromptImages | None:
        """PromptImages of PIL images or encoded image bytes (None for no images)."""
        if not images:
            return None
        try:
            out = self.hf(images=[_pil(im) for im in images], return_tensors="np")
        except Exception as e:  # PIL and the processor raise many types (decode, aspect ratio ..)
            raise ImageError(f"image preprocessing failed: {type(e).__name__}: {e}") from None
        return PromptImages(np.asarray(out["pixel_values"], np.float32),
                            np.asarray(out["image_grid_thw"], np.int32).reshape(-1, 3))


def _pil(image):
    if isinstance(image, (bytes, bytearray)):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    return image


def load_image_processor(model_dir: str | None, vision: VisionConfig, *,
                         min_pixels: int = DEFAULT_MIN_PIXELS,
                         max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageProcessor:
    """The checkpoint's image processor (preprocessor_config.json) with the pixel bounds set;
    without that file, the Qwen2-VL processor built from the model's vision config (its
    normalisation is the CLIP mean/std every Qwen2-VL / 2.5-VL checkpoint uses)."""
    if not 0 < min_pixels <= max_pixels:
        raise VisionInputError(f"vision.min_pixels={min_pixels}, vision.max_pixels={max_pixels}: "
                               "need 0 < min_pixels <= max_pixels")
    bounds = dict(min_pixels=min_pixels, max_pixels=max_pixels)
    if model_dir and os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
        from transformers import AutoImageProcessor

        hf = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True, **bounds)
    else:
        from transformers import Qwen2VLImageProcessorPil

        hf = Qwen2VLImageProcessorPil(patch_size=vision.patch_size,
                                      temporal_patch_size=vision.temporal_patch_size,
                                      merge_size=vision.spatial_merge_size, **bounds)
    return ImageProcessor(hf, vision)


# ---- prompts -------------------------------------------------------------------------------------

def vl_chat_template(model_dir: str) -> str | None:
    """The processor's chat template saved beside a checkpoint (chat_template.jinja, or
    chat_template.json as the Qwen2.5-VL hub repositories ship it), None if there is none."""
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    path = os.path.join(model_dir, "chat_template.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f).get("chat_template")
    return None


def user_message(text: str, num_images: int) -> dict:
    """One user turn with `{"type": "image"}` items where the text has `<image>` (EasyR1's
    layout); a text without placeholders gets its images first."""
    if num_images and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER * num_images + text
    content = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if part:
            content.append({"type": "text", "text": part})
    return {"role": "user", "content": content}


def render_vl_prompt(tokenizer, problem: str, images: PromptImages | None, *, merge_size: int,
                     template: str = "think_boxed", use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt with images: the template's text in the chat template, each image
    as <|vision_start|> + one <|image_pad|> per merged patch block + <|vision_end|>."""
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r}: choose from {sorted(PROMPT_TEMPLATES)}")
    text = PROMPT_TEMPLATES[template].replace("{problem}", problem.strip())
    counts = [] if images is None else images.tokens_per_image(merge_size)
    placeholders = text.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(counts):
        raise ImageError(f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                         f"{len(counts)} images: {problem[:80]!r}")
    if use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise VisionInputError("the tokenizer has no chat template; set "
                                   "prompt.use_chat_template=False or use the checkpoint's tokenizer")
        rendered = tokenizer.apply_chat_template([user_message(text, len(counts))], tokenize=False,
                                                 add_generation_prompt=True)
    else:
        if counts and not placeholders:
            text = IMAGE_PLACEHOLDER * len(counts) + text
        rendered = text.replace(IMAGE_PLACEHOLDER, VISION_START + IMAGE_PAD + VISION_END)
    pieces = rendered.split(IMAGE_PAD)
    if len(pieces) - 1 != len(counts):
        raise VisionInputError(
            f"the chat template wrote {len(pieces) - 1} {IMAGE_PAD} for {len(counts)} images; the "
            "tokenizer's chat template must be the Qwen2-VL one that places images (the "
            "checkpoint's chat_template.json)")
    expanded = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
    return tokenizer.encode(expanded, add_special_tokens=False)


def render_record(tokenizer, record, *, template: str = "think_boxed", use_chat_template: bool = True,
                  image_processor: ImageProcessor | None = None) -> tuple[list[int], PromptImages | None]:
    """(prompt ids, images) of a `uecjax.data.Record`: with an image processor (a Qwen2.5-VL
    policy) and images, the VL prompt; otherwise the text prompt (`<image>` stays as text)."""
    if image_processor is None or not record.images:
        return render_prompt(tokenizer, record.prompt, template=template,
                             use_chat_template=use_chat_template), None
    images = image_processor(record.images)
    ids = render_vl_prompt(tokenizer, record.prompt, images, template=template,
                           use_chat_template=use_chat_template,
                           merge_size=image_processor.vision.spatial_merge_size)
    return ids, images


# ---- per-row arrays -------------------------------------------------------------------------------

def stack_images(images: Sequence[PromptImages | None], patch_dim: int,
                 width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows' images as two arrays (the host storage of `uecjax.rows.Rows`): pixel values
    [n, N, patch_dim] zero-padded to the longest row (or to `width`, e.g. its patch bucket),
    grids [n, K, 3] with zero rows where a row has fewer than K images."""
    N = max([0] + [im.num_patches for im in images if im is not None])
    N = N if width is None else max(N, width)
    K = max([1] + [len(im.grid_thw) for im in images if im is not None])
    pixels = np.zeros((len(images), N, patch_dim), np.float32)
    grids = np.zeros((len(images), K, 3), np.int32)
    for i, im in enumerate(images):
        if im is not None:
            pixels[i, :im.num_patches] = im.pixel_values
            grids[i, :len(im.grid_thw)] = im.grid_thw
    return pixels, grids


def real_grids(grid_row) -> np.ndarray:
    """A row's image grids [k, 3] without its zero padding rows."""
    grid_row = np.asarray(grid_row).reshape(-1, 3)
    return grid_row[grid_row.prod(axis=1) > 0]


def patch_bucket(num_patches: int, buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS) -> int:
    for b in sorted(buckets):
        if num_patches <= b:
            return b
    raise VisionInputError(f"a prompt's images have {num_patches} patches, more than the largest "
                           f"patch bucket {max(buckets)}; lower vision.max_pixels")


def resized_size(height: int, width: int, vision: VisionConfig, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) the Qwen2-VL image processor resizes an image to: sides multiples of
    patch_size * merge_size, pixel count within [min_pixels, max_pixels], aspect ratio kept
    (transformers' `smart_resize`)."""
    f = vision.patch_size * vision.spatial_merge_size
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return h, w


class VisionRows(NamedTuple):
    """The jitted model's vision inputs for n rows (`Qwen2_5_VL.embed_rows`)."""

    positions: np.ndarray  # [n, 3, T] int32 M-RoPE positions
    rope_deltas: np.ndarray  # [n] int32: a decoded token's position = real tokens before it + delta
    pixel_values: np.ndarray  # [n, N, patch_dim] float32, N a patch bucket
    layouts: VisionLayout  # per-row layouts stacked on a leading n axis


def row_patches(grids) -> int:
    """The most patches any row's images have (grids: [B, K, 3] as `stack_images` stores them)."""
    return max([0] + [int(real_grids(g).prod(axis=1).sum()) for g in np.asarray(grids)])


def vision_rows(tokens, mask, pixels, grids, config: VLConfig,
                buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
                prompt_len: int | None = None, min_patches: int = 0) -> VisionRows:
    """Vision inputs of rows [n, T] (left-padded tokens) from their `stack_images` arrays.

    The images belong to the first prompt_len columns (default: all), the prompt; the rest
    (responses) is text, even where a sampled token happens to be an image token, as in
    transformers' generate. Positions are M-RoPE's over the prompt (get_rope_index) and
    continue as text after it: real tokens before + rope_delta.
    Patches are padded to the bucket of the largest row's (`row_patches`) or of min_patches,
    whichever is larger: processes that batch rows together agree on it that way.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    n, T = tokens.shape
    P = T if prompt_len is None else prompt_len
    per_row = [real_grids(g) for g in grids]
    N = patch_bucket(max([min_patches] + [int(g.prod(axis=1).sum()) for g in per_row]), buckets)
    for i, g in enumerate(per_row):  # a readable error before the positions' own checks
        check_grid(g, config.vision)
        want = int(g.prod(axis=1).sum()) // config.vision.spatial_merge_size**2
        have = int(((tokens[i, :P] == config.image_token_id) & (mask[i, :P] > 0)).sum())
        if want != have:
            raise VisionInputError(f"row {i}: {have} image tokens for images {g.tolist()} that need "
                                   f"{want}; render prompts with render_vl_prompt")
    flat = np.concatenate(per_row) if per_row else np.zeros((0, 3), np.int32)
    prompt_positions, deltas = mrope_positions(
        tokens[:, :P], mask[:, :P], flat, image_token_id=config.image_token_id,
        video_token_id=config.video_token_id, spatial_merge_size=config.vision.spatial_merge_size)
    text = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + deltas[:, None]
    positions = np.broadcast_to(text[None], (3, n, T)).astype(np.int32)
    positions[:, :, :P] = prompt_positions
    padded = np.asarray(pixels, np.float32)
    if padded.shape[1] != N:  # columns past N are padding (rows selected from wider sets)
        padded = np.zeros((n, N, config.vision.patch_dim), np.float32)
        take = min(pixels.shape[1], N)
        padded[:, :take] = pixels[:, :take]
    layouts = [padded_vision_layout(g, config.vision, N) for g in per_row]
    stacked = jax.tree.map(lambda *x: np.stack(x), *layouts)
    return VisionRows(np.ascontiguousarray(positions.transpose(1, 0, 2)), deltas, padded, stacked)
