"""Qwen2 / Qwen2.5 decoder configuration, parsed from a Hugging Face `config.json`.

Two layouts exist in the wild: the flat hub layout (`rope_theta`, `rope_scaling` at the top
level, as the Qwen2.5 checkpoints ship) and the nested transformers-5 layout (`text_config`
for multimodal models, `rope_parameters` instead of `rope_theta` / `rope_scaling`).
`TextConfig.from_hf` reads both.
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
REMAT_MODES = ("none", "per_layer", "full")


def remat_mode(value) -> str:
    """A remat setting as one of REMAT_MODES: booleans are the old switch (True meant a
    checkpoint around each layer that keeps nothing inside it, which is "full")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_MODES:
        raise ConfigError(f"remat={value!r}: choose from {REMAT_MODES}")
    return value


class ConfigError(ValueError):
    """A config.json (or a config value) that uecjax cannot use; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class TextConfig:
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

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        object.__setattr__(self, "remat", remat_mode(self.remat))
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"{name}={getattr(self, name)!r}: use float32 or bfloat16")
        rope_type = self.rope_dict().get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

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
        theta = rope.pop("rope_theta", None) or text.get("rope_theta") or hf.get("rope_theta") or 10000.0
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
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=text.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(tie),
        )
        fields.update(overrides)
        try:
            return cls(**fields)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

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
