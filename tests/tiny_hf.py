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
