"""Models: the Qwen2 decoder, Qwen2.5-VL and Hugging Face checkpoint I/O."""

from uecjax.models.config import ConfigError, TextConfig, VisionConfig, VLConfig
from uecjax.models.hf import CheckpointError, from_pretrained, save_pretrained
from uecjax.models.qwen2 import KVCache, Qwen2, default_positions
from uecjax.models.qwen2_5_vl import Qwen2_5_VL, mrope_positions
from uecjax.models.vision import VisionLayout, padded_vision_layout, vision_layout

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Qwen2", "Qwen2_5_VL", "TextConfig",
           "VLConfig", "VisionConfig", "VisionLayout", "default_positions", "from_pretrained",
           "mrope_positions", "padded_vision_layout", "save_pretrained", "vision_layout"]
