"""Models: the Qwen2 decoder and Hugging Face checkpoint I/O."""

from uecjax.models.config import ConfigError, TextConfig
from uecjax.models.hf import CheckpointError, from_pretrained, save_pretrained
from uecjax.models.qwen2 import KVCache, Qwen2, default_positions

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Qwen2", "TextConfig", "default_positions",
           "from_pretrained", "save_pretrained"]
