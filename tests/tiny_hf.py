"""Tiny random Hugging Face checkpoints written in-process with transformers + torch (CPU)."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_qwen2(seed: int = 0, std: float = 0.1, **overrides) -> Qwen2ForCausalLM:
    """A random Qwen2ForCausalLM; weights ~ N(0, std) (biases and norms too) so logits vary."""
    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY, **overrides})
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # keep norms near 1, as trained models have
                p.add_(1.0)
    return model


def write_tiny_qwen2(path, seed: int = 0, std: float = 0.1, **overrides) -> Qwen2ForCausalLM:
    """Writes a tiny random Qwen2 checkpoint (config.json + model.safetensors) to `path`."""
    model = tiny_qwen2(seed, std, **overrides)
    model.save_pretrained(str(path))
    return model


# Qwen2.5-VL: head_dim 16, so mrope_section sums to 8. Vision: windows of 56 px = 2x2 merged
# tokens (4x4 patches), so images larger than that are split into several windows; block 1
# of 2 attends whole images.
TINY_VL_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
TINY_VL_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                      fullatt_block_indexes=[1], in_channels=3)
TINY_VL_TOKENS = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102,
                      vision_end_token_id=103)


def tiny_qwen2_5_vl(seed: int = 0, std: float = 0.1, text=None, vision=None, **overrides):
    """A random Qwen2_5_VLForConditionalGeneration (eager attention, float32, eval mode)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(text_config={**TINY_VL_TEXT, "bos_token_id": None, "eos_token_id": None,
                                           **(text or {})},
                              vision_config={**TINY_VL_VISION, **(vision or {})},
                              **{**TINY_VL_TOKENS, **overrides})
    config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
            if "norm" in name or "ln_q" in name:  # keep norms near 1, as trained models have
                p.add_(1.0)
    return model
