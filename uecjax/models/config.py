"""Qwen2 / Qwen2.5 decoder configuration, parsed from a Hugging Face `config.json`.

Two layouts exist in the wild: the flat hub layout (`rope_theta`, `rope_scaling` at the top
level, as the Qwen2.5 checkpoints ship) and the nested transformers-5 layout (`text_config`
for multimodal models, `rope_parameters` instead of `rope_theta` / `rope_scaling`).
`TextConfig.from_hf` reads both. `VLConfig.from_hf` reads a Qwen2.5-VL config in either layout:
its decoder through `TextConfig.from_hf`, its vision tower from `vision_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

# model_type values whose language model is the Qwen2 decoder.
TEXT_MODEL_TYPES = ("qwen2",)
VL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "mrope")
# Decoder fields a config.json may omit, per model_type, as transformers' config classes fill
# them in (Qwen2Config; Qwen2VLTextConfig / Qwen2_5_VLTextConfig, whose default_theta is 1e6,
# for either layout of the VL configs).
TEXT_DEFAULTS = {
    "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6},
    "qwen2_vl": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5},
    "qwen2_5_vl": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5},
}
REMAT_MODES = ("none", "per_layer", "full")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")  # models/attention.py


def remat_mode(value) -> str:
    """A remat setting as one of REMAT_MODES: booleans are the old switch (True meant a
    checkpoint around each layer that keeps nothing inside it, which is "full")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_MODES:
        raise ConfigError(f"remat={value!r}: choose from {REMAT_MODES}")
    return value


def check_attention(value) -> None:
    if value not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention={value!r}: choose from {ATTENTION_IMPLEMENTATIONS}")


class ConfigError(ValueError):
    """A config.json (or a config value) that uecjax cannot use; the message says what to fix."""


class _Dtypes:
    """`dtype` (compute) and `param_dtype` (storage) fields as jnp dtypes."""

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def _check_dtypes(self) -> None:
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name}={getattr(self, name)!r}: use float32 or bfloat16")


def _from_fields(cls, fields: dict[str, Any], overrides: dict[str, Any], where: str):
    """`cls(**fields)` with `overrides` on top; what the config rejects (a ConfigError, or a
    TypeError for a field it does not have) is raised as a ConfigError starting with `where`."""
    try:
        return cls(**{**fields, **overrides})
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class TextConfig(_Dtypes):
    """The Qwen2 decoder's shape and numerics. Field names follow transformers' Qwen2Config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # transformers' rope dict without rope_theta: {"rope_type": "yarn", "factor": 4.0, ...}.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Compute dtype of matmuls; softmax, norms, log-probs and entropies always run in float32.
    dtype: str = "float32"
    # Storage dtype of the parameters.
    param_dtype: str = "float32"
    # What the backward pass recomputes instead of keeping (REMAT_MODES; True / False are
    # accepted for "full" / "none"). See uecjax.models.qwen2.remat_policy.
    remat: str = "none"
    # Attention implementation (uecjax.models.attention.IMPLEMENTATIONS): auto picks the fused
    # kernel of the backend, or the chunked path for long sequences where there is none.
    attention: str = "auto"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        object.__setattr__(self, "remat", remat_mode(self.remat))
        check_attention(self.attention)
        self._check_dtypes()
        rope_type = self.rope_dict().get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def rope_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    def replace(self, **changes) -> "TextConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> "TextConfig":
        """Builds the decoder config from a parsed HF config dict (flat or nested layout)."""
        model_type = hf.get("model_type")
        if model_type not in TEXT_MODEL_TYPES + VL_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; uecjax loads "
                f"{', '.join(TEXT_MODEL_TYPES + VL_MODEL_TYPES)}")
        text = hf.get("text_config") or hf
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in text]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing} for model_type {model_type!r}")
        if text.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported; set it to false "
                              "(the Qwen2.5 checkpoints ship with it off)")
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
        defaults = TEXT_DEFAULTS[model_type]
        theta = (rope.pop("rope_theta", None) or text.get("rope_theta") or hf.get("rope_theta")
                 or defaults["rope_theta"])
        # Old configs spell the kind "type"; Qwen2-VL's "mrope" is plain RoPE per section.
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        rope_scaling = tuple(sorted((k, _freeze(v)) for k, v in rope.items())) or None
        tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        fields = dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=text.get("head_dim"),
            rms_norm_eps=text.get("rms_norm_eps", defaults["rms_norm_eps"]),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(tie),
        )
        return _from_fields(cls, fields, overrides, source)

    def to_hf(self) -> dict[str, Any]:
        """The flat hub layout of config.json (readable by transformers 4 and 5)."""
        rope = self.rope_dict()
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope or None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "torch_dtype": self.param_dtype,
        }


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


def read_hf_config(path: str) -> dict[str, Any]:
    """Reads `config.json` from a checkpoint directory (or the file itself) with clear errors."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(
            f"{file}: not found. A Hugging Face checkpoint directory holds config.json and "
            "*.safetensors; download one elsewhere with `huggingface-cli download <repo> "
            "--local-dir <dir>` and copy it here.")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None


# Fields of transformers' Qwen2_5_VLVisionConfig and its defaults (used where a field is absent,
# as transformers itself does).
VISION_DEFAULTS = dict(depth=32, hidden_size=3584, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584, patch_size=14, temporal_patch_size=2,
                       spatial_merge_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
                       in_channels=3, hidden_act="silu", tokens_per_second=4)
VISION_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Dtypes):
    """The Qwen2.5-VL vision tower. Field names follow transformers' Qwen2_5_VLVisionConfig."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the merger's output: the decoder's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels; windows hold (window_size // patch_size)^2 patches
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks attending the whole image
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0  # of the 2D rotary embedding of the patches
    tokens_per_second: int = 4  # videos only; kept so that a saved config round-trips
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # as TextConfig.remat; the tower remats whole blocks unless "none"
    attention: str = "auto"  # as TextConfig.attention

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_mode(self.remat))
        check_attention(self.attention)
        object.__setattr__(self, "fullatt_block_indexes", tuple(self.fullatt_block_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"vision hidden_size={self.hidden_size} / num_heads={self.num_heads} must give a "
                "head dim divisible by 4 (half rotates with the patch row, half with the column)")
        if self.window_size < self.patch_size * self.spatial_merge_size:
            raise ConfigError(
                f"vision window_size={self.window_size} is smaller than one merged patch "
                f"(patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size})")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision fullatt_block_indexes {bad} are outside 0..depth-1={self.depth - 1}")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise ConfigError(f"vision hidden_act={self.hidden_act!r}: supported {VISION_ACTIVATIONS}")
        self._check_dtypes()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: in_channels * temporal_patch_size * patch_size^2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def replace(self, **changes) -> "VisionConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, vision: dict[str, Any], *, source: str = "config.json", **overrides) -> "VisionConfig":
        """From an HF `vision_config` dict; the older hub spells in_channels `in_chans`."""
        fields = {k: vision.get(k, default) for k, default in VISION_DEFAULTS.items()}
        if "in_channels" not in vision and "in_chans" in vision:
            fields["in_channels"] = vision["in_chans"]
        rope = vision.get("rope_parameters") or {}
        fields["rope_theta"] = float(rope.get("rope_theta", 10000.0))
        return _from_fields(cls, fields, overrides, f"{source}: vision_config")

    def to_hf(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in VISION_DEFAULTS}
        out["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        out.update(model_type="qwen2_5_vl_vision",
                   rope_parameters={"rope_type": "axial", "rope_theta": self.rope_theta})
        return out


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """Qwen2.5-VL: the Qwen2 decoder, the vision tower and the special tokens that join them."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size={self.vision.out_hidden_size} differs from the decoder's "
                f"hidden_size={self.text.hidden_size}: image features could not replace token embeddings")
        section = self.mrope_section
        if sum(section) != self.text.head_dim // 2:
            raise ConfigError(
                f"mrope_section {list(section)} sums to {sum(section)}, but the decoder's head_dim "
                f"{self.text.head_dim} needs sections summing to {self.text.head_dim // 2}")

    @property
    def mrope_section(self) -> tuple[int, ...]:
        """Rotary frequencies driven by the temporal, height and width positions (in that order)."""
        return tuple(self.text.rope_dict().get("mrope_section", (16, 24, 24)))

    # The decoder's numerics, so callers written for a Qwen2 (scoring, sampling) work unchanged.
    @property
    def compute_dtype(self):
        return self.text.compute_dtype

    @property
    def weight_dtype(self):
        return self.text.weight_dtype

    def replace(self, **changes) -> "VLConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> "VLConfig":
        """From a Qwen2.5-VL config dict, flat (older hub) or nested (transformers 5).

        overrides (dtype, param_dtype, remat, attention) apply to both the decoder and the vision tower.
        """
        model_type = hf.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not a Qwen2.5-VL model ('qwen2_5_vl'); "
                "for Qwen2-VL and others, load the language model alone (language_model_only=True)")
        if not isinstance(hf.get("vision_config"), dict):
            raise ConfigError(f"{source}: no vision_config; is this a Qwen2.5-VL checkpoint?")
        text = TextConfig.from_hf(hf, source=source, **overrides)
        vision = VisionConfig.from_hf(hf["vision_config"], source=source, **overrides)
        tokens = {k: hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                     "vision_end_token_id") if hf.get(k) is not None}
        try:
            return cls(text=text, vision=vision, **tokens)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The nested layout transformers 5 writes (`text_config`, `vision_config`)."""
        text = self.text.to_hf()
        for key in ("architectures", "rope_theta", "rope_scaling", "tie_word_embeddings", "head_dim"):
            text.pop(key)
        rope = self.text.rope_dict()
        if rope.get("rope_type", "default") == "mrope":  # transformers' name for it is "default"
            rope["rope_type"] = "default"
        rope = {k: list(v) if isinstance(v, tuple) else v for k, v in rope.items()}
        text.update(model_type="qwen2_5_vl_text", rope_parameters={
            "rope_type": "default", **rope, "rope_theta": self.text.rope_theta})
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": text,
            "vision_config": self.vision.to_hf(),
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "torch_dtype": self.text.param_dtype,
        }


def model_config_from_hf(hf: dict[str, Any], *, source: str = "config.json", language_model_only=False,
                         **overrides) -> TextConfig | VLConfig:
    """The config of the model `from_pretrained` builds: VLConfig for Qwen2.5-VL, else TextConfig.

    language_model_only: the decoder's TextConfig even for a VL checkpoint.
    """
    if hf.get("model_type") in VL_MODEL_TYPES and not language_model_only:
        return VLConfig.from_hf(hf, source=source, **overrides)
    return TextConfig.from_hf(hf, source=source, **overrides)
