"""Named decoder shapes, for dry runs and memory planning without a checkpoint on disk.

    config = preset("qwen2.5-7b", dtype="bfloat16", remat="full")

Values are those of the public Hugging Face `config.json` files of the Qwen2.5 Instruct
checkpoints (Qwen/Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct) and of the language model inside
Qwen/Qwen2.5-VL-{3B,7B}-Instruct. "tiny" is a toy shape for tests and smoke runs.
"""

from __future__ import annotations

from uecjax.models.config import ConfigError, TextConfig

_QWEN25 = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=32768)
_MROPE = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=128000,
              rope_scaling=(("mrope_section", (16, 24, 24)), ("rope_type", "default")))

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=2048),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, **_QWEN25),
    # The language models of Qwen2.5-VL: the text shapes above, M-RoPE positions.
    "qwen2.5-vl-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                          num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                          tie_word_embeddings=True, **_MROPE),
    "qwen2.5-vl-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                          tie_word_embeddings=False, **_MROPE),
}


def preset(name: str, **overrides) -> TextConfig:
    """The TextConfig of a named shape; overrides set numerics (dtype, param_dtype, remat)."""
    if name not in PRESETS:
        raise ConfigError(f"config.model.preset={name!r}: choose from {sorted(PRESETS)}")
    return TextConfig(**{**PRESETS[name], **overrides})


def parameter_count(config: TextConfig) -> int:
    """Number of parameters of a Qwen2 decoder of this shape (embedding counted once if tied)."""
    H, I, L, V = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                  config.vocab_size)
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * I + 2 * H
    return V * H * (1 if config.tie_word_embeddings else 2) + L * per_layer + H
