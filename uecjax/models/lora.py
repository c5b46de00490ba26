"""LoRA adapters on the decoder's projections: y = x W + (alpha / r) (x A) B.

    add_lora(model, LoraSpec(rank=64, alpha=128), mesh=mesh)   # uecjax.models.lora_init
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)

The adapters are stacked like the weights they adapt (A [layers, in, r], B [layers, r, out],
next to `q_w` as `q_lora_a` / `q_lora_b`) and typed `nnx.LoRAParam`, so flax's filters split
them from the frozen base. They are applied unmerged in every pass (training, scoring,
sampling): the sampler reads the current adapters as arguments, so updating them recompiles
nothing and no merged copy of the weights exists. `merge_layer_arrays` merges them for the
Hugging Face export; `uecjax.models.peft_export` writes them in the PEFT layout.

Why not a library: qwix (tunix's LoRA) finds the weight of an intercepted dot as an
`nnx.Param` attribute of the calling module, and flax's `nnx.LoRA` wraps one linear module.
Our decoder keeps all layers' weights stacked and runs them under `lax.scan` (and unrolled
from one dict in the decode loop), so neither sees a per-layer weight to adapt; both would
need the model restructured into per-layer modules, losing the scan's compile time and the
decode loop's in-place reads. The math here is two matmuls; flax's `LoRAParam` is used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Projection name -> its Hugging Face module under "layers.{i}." (PEFT's target_modules).
TARGETS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}


class LoraError(ValueError):
    """A LoRA setting out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    dropout: float = 0.0  # on the adapters' input, in the differentiated pass only

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise LoraError(f"lora rank={self.rank}: must be >= 1 (0 turns LoRA off)")
        if self.alpha <= 0:
            raise LoraError(f"lora alpha={self.alpha}: must be > 0 (the adapters' scale is alpha / rank)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise LoraError(f"lora targets={self.targets}: give distinct names from {tuple(TARGETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora dropout={self.dropout}: must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_names(target: str) -> tuple[str, str]:
    return f"{target}_lora_a", f"{target}_lora_b"


def adapter_axes(in_axis: str, out_axis: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes of a target's (A, B). A factor whose other axis is the hidden one ("embed",
    split over fsdp) keeps its rank axis whole ("lora"); the other factor (its other axis is
    heads or MLP, split over tensor only) splits the rank axis over fsdp instead ("lora_fsdp"),
    so that every adapter is split over fsdp as its base weight is, and not replicated."""
    def rank_axis(other):
        return "lora" if other == "embed" else "lora_fsdp"

    return ("layers", in_axis, rank_axis(in_axis)), ("layers", rank_axis(out_axis), out_axis)


def decoder_layers(model):
    """The stacked `DecoderLayers` of a Qwen2 or a Qwen2_5_VL."""
    return model.language_model.layers if hasattr(model, "language_model") else model.layers


def lora_spec(model) -> LoraSpec | None:
    return decoder_layers(model).lora


def project(h, p: dict, name: str, dt, spec: LoraSpec | None, dropout_key=None):
    """h @ W (+ the adapter's (alpha / r) (h A) B where `name` has one); no bias."""
    y = h @ p[f"{name}_w"].astype(dt)
    name_a, name_b = adapter_names(name)
    if spec is None or name_a not in p:
        return y
    x = h
    if dropout_key is not None and spec.dropout > 0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - spec.dropout, h.shape)
        x = jnp.where(keep, h / (1.0 - spec.dropout), 0).astype(h.dtype)
    delta = (x @ p[name_a].astype(dt)) @ p[name_b].astype(dt)
    return y + delta * jnp.asarray(spec.scale, dt)


def merge_layer_arrays(arrays: dict[str, np.ndarray], spec: LoraSpec | None) -> dict[str, np.ndarray]:
    """Host layer arrays with each adapted W replaced by W + (alpha / r) A B (in float32, cast
    back to W's dtype) and the adapters dropped: the weights a plain model would carry."""
    out = {k: v for k, v in arrays.items() if "_lora_" not in k}
    if spec is None:
        return out
    for target in spec.targets:
        name_a, name_b = adapter_names(target)
        w = out[f"{target}_w"]
        delta = np.einsum("lir,lro->lio", np.asarray(arrays[name_a], np.float32),
                          np.asarray(arrays[name_b], np.float32))
        out[f"{target}_w"] = (np.asarray(w, np.float32) + spec.scale * delta).astype(w.dtype)
    return out


def zero_adapters(adapters):
    """The adapters with B = 0: with them the model is the base model exactly (the KL
    reference for free, no copy of the weights)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "_lora_b" in jax.tree_util.keystr(path) else x, adapters)
