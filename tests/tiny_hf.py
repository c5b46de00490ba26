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


# The Qwen2-VL / Qwen2.5-VL chat template (as the hub checkpoints ship it): images and videos
# in a user turn become <|vision_start|><|image_pad|><|vision_end|>, which the processor then
# expands to one <|image_pad|> per merged patch block.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def tiny_vl_tokenizer():
    """The demo's character tokenizer plus Qwen2-VL's vision tokens (ids 102..105) and its
    chat template: real prompts (Geometry3K text) tokenize with a 106-token vocabulary."""
    from uecjax.tokenizer import char_tokenizer

    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(VISION_SPECIALS)},
                           replace_extra_special_tokens=False)
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return tok


def write_tiny_vl(path, seed: int = 0, std: float = 0.1, min_pixels: int = 28 * 28,
                  max_pixels: int = 112 * 112):
    """A tiny random Qwen2.5-VL checkpoint with its tokenizer (tiny_vl_tokenizer) and image
    processor (preprocessor_config.json) in `path`, as a hub checkpoint directory holds them."""
    from transformers import Qwen2VLImageProcessorPil

    tok = tiny_vl_tokenizer()
    vs, ve, img, vid = tok.convert_tokens_to_ids(list(VISION_SPECIALS))
    model = tiny_qwen2_5_vl(seed, std, text={"vocab_size": len(tok), "max_position_embeddings": 4096},
                            image_token_id=img, video_token_id=vid, vision_start_token_id=vs,
                            vision_end_token_id=ve)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(str(path))
    return model, tok
