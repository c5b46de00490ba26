"""LoRA adapters in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`),
which `peft.PeftModel.from_pretrained` and vLLM's LoRA loader read on top of the base model.

    save_adapter(model, "run/adapter", base_model="Qwen/Qwen2.5-VL-7B-Instruct")

Tensors are named as PEFT names them on the transformers model: `base_model.model.` + the
module path + `.lora_A.weight` [r, in] / `.lora_B.weight` [out, r] (torch's output-major
layout; ours are input-major, so each is transposed). The decoder of a Qwen2.5-VL lives at
`model.language_model.` in transformers 5, and its target_modules are a regex over that path
so that the vision tower's same-named MLP projections are not adapted.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from safetensors.numpy import save_file

from uecjax.models.hf import atomic_directory
from uecjax.models.lora import TARGETS, adapter_names, decoder_layers, lora_spec
from uecjax.parallel.gather import to_host

TEXT_PREFIX = "base_model.model.model.layers."
VL_PREFIX = "base_model.model.model.language_model.layers."


def adapter_tensors(model) -> dict[str, np.ndarray]:
    """The adapters as PEFT-named host arrays (a gather on every process)."""
    spec = lora_spec(model)
    if spec is None:
        raise ValueError("the model has no LoRA adapters (config.model.lora.rank = 0)")
    is_vl = hasattr(model, "language_model")
    prefix = VL_PREFIX if is_vl else TEXT_PREFIX
    layers = decoder_layers(model)
    arrays = to_host({name: getattr(layers, name)[...] for t in spec.targets for name in adapter_names(t)})
    out = {}
    for target in spec.targets:
        name_a, name_b = adapter_names(target)
        for i in range(arrays[name_a].shape[0]):
            module = f"{prefix}{i}.{TARGETS[target]}"
            out[f"{module}.lora_A.weight"] = np.ascontiguousarray(arrays[name_a][i].T)
            out[f"{module}.lora_B.weight"] = np.ascontiguousarray(arrays[name_b][i].T)
    return out


def adapter_config(model, base_model: str = "") -> dict:
    spec = lora_spec(model)
    modules = [TARGETS[t].split(".")[-1] for t in spec.targets]
    if hasattr(model, "language_model"):  # the decoder's projections, not the vision tower's
        modules = rf".*language_model\.layers\.\d+\..*\.({'|'.join(modules)})"
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }


def save_adapter(model, path: str, *, base_model: str = "") -> None:
    """Writes the adapter directory atomically; in a multi-process job call it on every
    process (all gather, process 0 writes)."""
    tensors = adapter_tensors(model)
    if jax.process_index() == 0:
        with atomic_directory(path) as tmp:
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(adapter_config(model, base_model), f, indent=2)
            save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(f"save_adapter {path}")
