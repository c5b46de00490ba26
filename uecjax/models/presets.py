"""Named model shapes, for dry runs and memory planning without a checkpoint on disk.

    config = preset("qwen2.5-7b", dtype="bfloat16", remat="full")      # TextConfig
    config = preset("qwen2.5-vl-3b", dtype="bfloat16")                  # VLConfig

Values are those of the public Hugging Face `config.json` files of the Qwen2.5 Instruct
checkpoints (Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct) and of Qwen/Qwen2.5-VL-{3B,7B}-Instruct,
whose presets are the whole model (`VLConfig`: the decoder, the vision tower, the special
tokens), as `model_config_from_hf` reads their config.json; `language_model_only=True` gives
their decoder alone. "tiny" and "tiny-vl" are toy shapes for tests and smoke runs.
"""

from __future__ import annotations

from uecjax.models.config import ConfigError, TextConfig, VisionConfig, VLConfig

_QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768)
_MROPE = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=128000,
              rope_scaling=(("mrope_section", (16, 24, 24)), ("rope_type", "default")))
# The vision tower of both Qwen2.5-VL sizes (vision_config); out_hidden_size is the decoder's.
_QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                         patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                         fullatt_block_indexes=(7, 15, 23, 31), in_channels=3, hidden_act="silu",
                         tokens_per_second=2)
_QWEN25_VL_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                         vision_end_token_id=151653)
_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=2048)

# The TextConfig fields that tell the Qwen2.5 sizes apart, and their values per size (the
# Qwen2.5-VL 3B and 7B decoders are those of the 3B and 7B).
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")
_QWEN25_SIZES = {
    "0.5b": (151936, 896, 4864, 24, 14, 2, True),
    "1.5b": (151936, 1536, 8960, 28, 12, 2, True),
    "3b": (151936, 2048, 11008, 36, 16, 2, True),
    "7b": (152064, 3584, 18944, 28, 28, 4, False),
}


def _qwen25(size: str, **rest) -> dict:
    """A Qwen2.5 size's preset: its decoder's shape (`_QWEN25_SIZES`), then `rest`."""
    return {**dict(zip(_SIZE_FIELDS, _QWEN25_SIZES[size])), **rest}


# Text presets: TextConfig fields. VL presets: the decoder's fields plus "vision"
# (VisionConfig fields but out_hidden_size) and "tokens" (VLConfig's special token ids).
PRESETS: dict[str, dict] = {
    "tiny": _TINY,
    "qwen2.5-0.5b": _qwen25("0.5b", **_QWEN25),
    "qwen2.5-1.5b": _qwen25("1.5b", **_QWEN25),
    "qwen2.5-3b": _qwen25("3b", **_QWEN25),
    "qwen2.5-7b": _qwen25("7b", **_QWEN25),
    # Qwen2.5-VL: the text shapes above with M-RoPE positions, and the vision tower.
    "qwen2.5-vl-3b": _qwen25("3b", **_MROPE, vision=_QWEN25_VL_VISION, tokens=_QWEN25_VL_TOKENS),
    "qwen2.5-vl-7b": _qwen25("7b", **_MROPE, vision=_QWEN25_VL_VISION, tokens=_QWEN25_VL_TOKENS),
    # "tiny" with M-RoPE (head_dim 16: sections summing to 8) and a 2-block tower whose 56 px
    # windows (2x2 merged tokens) split larger images; block 1 attends whole images.
    "tiny-vl": dict(**_TINY, rope_scaling=(("mrope_section", (2, 3, 3)), ("rope_type", "default")),
                    vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=14,
                                temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                                fullatt_block_indexes=(1,)),
                    tokens=dict(image_token_id=251, video_token_id=252, vision_start_token_id=249,
                                vision_end_token_id=250)),
}


def preset(name: str, *, language_model_only: bool = False, **overrides) -> TextConfig | VLConfig:
    """The config of a named shape: TextConfig, or VLConfig for the Qwen2.5-VL presets (their
    decoder's TextConfig with language_model_only=True). overrides set numerics (dtype,
    param_dtype, remat), for the decoder and the vision tower alike."""
    if name not in PRESETS:
        raise ConfigError(f"config.model.preset={name!r}: choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[name])
    vision, tokens = fields.pop("vision", None), fields.pop("tokens", None)
    text = TextConfig(**{**fields, **overrides})
    if vision is None or language_model_only:
        return text
    return VLConfig(text=text, vision=VisionConfig(**{**vision, **overrides},
                                                   out_hidden_size=text.hidden_size), **tokens)


def vision_parameter_count(config: VisionConfig) -> int:
    """Number of parameters of a Qwen2.5-VL vision tower: patch embedding (no bias), blocks,
    merger."""
    H, I, D = config.hidden_size, config.intermediate_size, config.depth
    merged = H * config.spatial_merge_size**2
    per_block = 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + 3 * H * I + 2 * I + H
    merger = H + (merged * merged + merged) + (merged * config.out_hidden_size + config.out_hidden_size)
    return config.patch_dim * H + D * per_block + merger


def parameter_count(config: TextConfig | VLConfig) -> int:
    """Number of parameters of a Qwen2 decoder of this shape (embedding counted once if tied),
    or of a whole Qwen2.5-VL (decoder + vision tower)."""
    if isinstance(config, VLConfig):
        return parameter_count(config.text) + vision_parameter_count(config.vision)
    H, I, L, V = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                  config.vocab_size)
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * I + 2 * H
    return V * H * (1 if config.tie_word_embeddings else 2) + L * per_layer + H
