"""Hugging Face checkpoint I/O without torch: config.json + safetensors <-> nnx models.

Reading is lazy and placed: every parameter is built with `jax.make_array_from_callback`,
so each device reads only its own shard, layer by layer, from the mmap'ed safetensors files.
Writing produces the Hugging Face layout (config.json, model.safetensors or shards with
model.safetensors.index.json) atomically: a partial write never replaces a good directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from uecjax.parallel.gather import to_host
from uecjax.models.config import ConfigError, VLConfig, model_config_from_hf, read_hf_config
from uecjax.models.lora import merge_layer_arrays
from uecjax.models.qwen2 import LAYER_PARAM_AXES, MODEL_PARAM_AXES, Qwen2
from uecjax.models.qwen2_5_vl import Qwen2_5_VL
from uecjax.models.vision import BLOCK_PARAM_AXES, TOWER_PARAM_AXES, VisionTower


class CheckpointError(ValueError):
    """A checkpoint whose files or tensors do not match the model; the message names them."""


def _linear(name: str, hf_name: str, *, bias: bool = True) -> dict[str, tuple[str, str]]:
    """The key table entries of a linear layer: `{name}_w` is `{hf_name}.weight` transposed
    and, with `bias`, `{name}_b` is `{hf_name}.bias`."""
    keys = {f"{name}_w": (f"{hf_name}.weight", "transposed")}
    if bias:
        keys[f"{name}_b"] = (f"{hf_name}.bias", "same")
    return keys


# The key tables: uecjax parameter -> (HF name, how ours is stored): "same", "transposed"
# (ours is input-major, torch's nn.Linear weight output-major), or "patch" (the Conv3d kernel
# [H, C, T, P, P] flattened to a [C * T * P * P, H] matmul). LAYER_KEYS: the HF name after
# "layers.{i}.".
LAYER_KEYS = {
    "input_norm": ("input_layernorm.weight", "same"),
    **_linear("q", "self_attn.q_proj"),
    **_linear("k", "self_attn.k_proj"),
    **_linear("v", "self_attn.v_proj"),
    **_linear("o", "self_attn.o_proj", bias=False),
    "post_norm": ("post_attention_layernorm.weight", "same"),
    **_linear("gate", "mlp.gate_proj", bias=False),
    **_linear("up", "mlp.up_proj", bias=False),
    **_linear("down", "mlp.down_proj", bias=False),
}
# Where the decoder's weights live in the known layouts (text model, VL model in
# transformers 4 and 5); the first prefix whose embed_tokens exists is used.
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")

# The vision tower's: the HF name after the vision prefix (and "blocks.{i}.").
VISION_BLOCK_KEYS = {
    "norm1": ("norm1.weight", "same"),
    **_linear("qkv", "attn.qkv"),
    **_linear("proj", "attn.proj"),
    "norm2": ("norm2.weight", "same"),
    **_linear("gate", "mlp.gate_proj"),
    **_linear("up", "mlp.up_proj"),
    **_linear("down", "mlp.down_proj"),
}
VISION_KEYS = {
    "patch_w": ("patch_embed.proj.weight", "patch"),
    "merger_norm": ("merger.ln_q.weight", "same"),
    **_linear("merger_fc1", "merger.mlp.0"),
    **_linear("merger_fc2", "merger.mlp.2"),
}
# The vision tower in the layout transformers 5.23 writes (and the older hub's), then the
# layout of transformers 5's in-memory module names.
VISION_PREFIXES = ("visual.", "model.visual.")

ShardingFn = Callable[[str, tuple], jax.sharding.Sharding]


def _np_dtype(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


class SafetensorsReader:
    """Name -> lazily sliced tensor over one or several (mmap'ed) safetensors files."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.source = index
        elif os.path.exists(single):
            weight_map = None
            self.source = single
        else:
            raise CheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json; a Hugging Face "
                "checkpoint in safetensors format is needed (PyTorch .bin files are not read)")
        self._files = {}
        if weight_map is None:
            handle = self._open(single)
            self.location = {name: single for name in handle.keys()}
        else:
            self.location = {name: os.path.join(path, file) for name, file in weight_map.items()}

    def _open(self, file):
        if file not in self._files:
            if not os.path.exists(file):
                raise CheckpointError(f"{file}: listed in {self.source} but missing")
            self._files[file] = safe_open(file, framework="numpy")
        return self._files[file]

    def __contains__(self, name):
        return name in self.location

    def shape(self, name) -> tuple[int, ...]:
        return tuple(self._open(self.location[name]).get_slice(name).get_shape())

    def read(self, name, index=()):
        return self._open(self.location[name]).get_slice(name)[index]


def _check_shape(reader, name, expected, param):
    if name not in reader:
        raise CheckpointError(f"{reader.source}: tensor {name!r} (for {param}) is missing")
    found = reader.shape(name)
    if found != tuple(expected):
        raise CheckpointError(
            f"{reader.source}: tensor {name!r} has shape {found}, the config asks {tuple(expected)} "
            f"(for {param}); does config.json belong to these weights?")


def _layer_param_callback(reader, prefix, param, shape, dtype):
    suffix, kind = LAYER_KEYS[param]
    transposed = kind == "transposed"
    names = [f"{prefix}layers.{i}.{suffix}" for i in range(shape[0])]
    for name in names:
        _check_shape(reader, name, shape[1:][::-1] if transposed else shape[1:], param)

    def callback(index):
        layers = range(shape[0])[index[0]]
        rest = tuple(index[1:])
        rows = []
        for i in layers:
            hf_index = rest[::-1] if transposed else rest
            t = reader.read(names[i], hf_index)
            rows.append(t.T if transposed else t)
        return np.stack(rows).astype(dtype)

    return callback


def _model_param_callback(reader, prefix, param, shape, dtype, cfg):
    name, transposed = {
        "embed": (f"{prefix}embed_tokens.weight", False),
        "final_norm": (f"{prefix}norm.weight", False),
        "lm_head": ("lm_head.weight", True),
    }[param]
    _check_shape(reader, name, shape[::-1] if transposed else shape, param)

    def callback(index):
        index = tuple(index)
        t = reader.read(name, index[::-1] if transposed else index)
        return (t.T if transposed else t).astype(dtype)

    return callback


def _find_prefix(reader, prefixes, tensor: str, what: str, advice: str) -> str:
    """The first of `prefixes` under which `reader` holds `tensor`; a CheckpointError saying
    that no `what` was found, then `advice`, where none does."""
    for prefix in prefixes:
        if f"{prefix}{tensor}" in reader:
            return prefix
    raise CheckpointError(
        f"{reader.source}: no {what} found (looked for {[p + tensor for p in prefixes]}); {advice}")


def _text_prefix(reader):
    return _find_prefix(reader, TEXT_PREFIXES, "embed_tokens.weight", "embedding tensor",
                        "is this a Qwen2 checkpoint?")


def _vision_prefix(reader):
    return _find_prefix(reader, VISION_PREFIXES, "patch_embed.proj.weight", "vision tower",
                        "to load the language model of this checkpoint alone, pass "
                        "language_model_only=True")


def _to_ours(t, kind):
    if kind == "transposed":
        return t.T
    if kind == "patch":
        return t.reshape(t.shape[0], -1).T
    return t


def _to_hf(t, kind, hf_shape):
    return t if kind == "same" else t.T.reshape(hf_shape)


def _vision_hf_shape(kind, shape, cfg):
    if kind == "patch":
        return (shape[1], cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    return tuple(shape[::-1]) if kind == "transposed" else tuple(shape)


def _vision_param_callback(reader, prefix, keys, shape, dtype, cfg):
    """Vision weights are small and replicated: each is read whole, converted, then indexed."""
    if keys[0] == "blocks":
        suffix, kind = VISION_BLOCK_KEYS[keys[-1]]
        names = [f"{prefix}blocks.{i}.{suffix}" for i in range(shape[0])]
        hf_shape = _vision_hf_shape(kind, shape[1:], cfg)
    else:
        suffix, kind = VISION_KEYS[keys[-1]]
        names = [f"{prefix}{suffix}"]
        hf_shape = _vision_hf_shape(kind, shape, cfg)
    for name in names:
        _check_shape(reader, name, hf_shape, "visual/" + "/".join(keys))

    def callback(index):
        arrays = [_to_ours(reader.read(name), kind) for name in names]
        full = np.stack(arrays) if keys[0] == "blocks" else arrays[0]
        return full[tuple(index)].astype(dtype)

    return callback


def default_sharding(name: str, axes: tuple) -> jax.sharding.Sharding:
    """Everything on the first local device (single-device runs)."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def load_params(model_abstract, path: str, *, sharding_fn: ShardingFn = default_sharding):
    """Fills an abstract (nnx.eval_shape) Qwen2 or Qwen2_5_VL from the safetensors in `path`."""
    reader = SafetensorsReader(path)
    prefix = _text_prefix(reader)
    is_vl = isinstance(model_abstract, Qwen2_5_VL)
    vision_prefix = _vision_prefix(reader) if is_vl else None
    graphdef, state = nnx.split(model_abstract)
    cfg = model_abstract.config
    filled = []
    for keys, var in nnx.to_flat_state(state):
        param = keys[-1]
        shape, dtype = var.shape, _np_dtype(str(var.dtype))
        # A VL model holds the decoder under "language_model" and the tower under "visual".
        text_keys = keys[1:] if is_vl and keys[0] == "language_model" else keys
        if is_vl and keys[0] == "visual":
            axes = (BLOCK_PARAM_AXES if keys[1] == "blocks" else TOWER_PARAM_AXES)[param]
            callback = _vision_param_callback(reader, vision_prefix, keys[1:], shape, dtype, cfg.vision)
        elif text_keys[0] == "layers":
            axes = LAYER_PARAM_AXES[param]
            callback = _layer_param_callback(reader, prefix, param, shape, dtype)
        else:
            axes = MODEL_PARAM_AXES[param]
            callback = _model_param_callback(reader, prefix, param, shape, dtype, cfg)
        sharding = sharding_fn("/".join(keys), axes)
        filled.append((keys, var.replace(jax.make_array_from_callback(shape, sharding, callback))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def from_pretrained(path: str, *, dtype: str = "float32", param_dtype: str | None = None,
                    remat: str | bool = "none", attention: str = "auto", sharding_fn: ShardingFn = default_sharding,
                    language_model_only: bool = False) -> Qwen2 | Qwen2_5_VL:
    """Loads an HF checkpoint directory: Qwen2/Qwen2.5 -> Qwen2, Qwen2.5-VL -> Qwen2_5_VL.

    dtype: compute dtype of the matmuls; param_dtype: storage dtype (default: same as dtype);
    remat: "none" | "per_layer" | "full" (`uecjax.models.qwen2.remat_policy`).
    attention: the attention implementation (`uecjax.models.attention`).
    language_model_only: load only the decoder of a VL checkpoint (Qwen2.5-VL, Qwen2-VL), as a
    Qwen2 that ignores the vision tower's tensors.
    """
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: checkpoint directory not found. Download one elsewhere, e.g. "
            f"`huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir {path}`")
    cfg = model_config_from_hf(read_hf_config(path), source=os.path.join(path, "config.json"),
                               language_model_only=language_model_only,
                               dtype=dtype, param_dtype=param_dtype or dtype, remat=remat,
                               attention=attention)
    cls = Qwen2_5_VL if isinstance(cfg, VLConfig) else Qwen2
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    return load_params(abstract, path, sharding_fn=sharding_fn)


def hf_tensors(model: Qwen2 | Qwen2_5_VL) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named host numpy arrays (torch layout).

    Whole stacked arrays come to the host first (a gather where parameters are sharded over
    other hosts' devices: every process must call this), then split per layer in numpy.
    Qwen2.5-VL is named as transformers 5.23 writes it: the decoder under `model.`, the
    vision tower under `visual.`, `lm_head.weight`. LoRA adapters are merged into the weights
    they adapt (`uecjax.models.peft` exports them alone).
    """
    if isinstance(model, Qwen2_5_VL):
        return {**hf_tensors(model.language_model), **_vision_tensors(model.visual)}
    cfg = model.config
    host = to_host({"embed": model.embed[...], "final_norm": model.final_norm[...],
                    "lm_head": None if model.lm_head is None else model.lm_head[...],
                    "layers": model.layers.arrays()})
    host["layers"] = merge_layer_arrays(host["layers"], model.layers.lora)  # LoRA merged in
    out = {"model.embed_tokens.weight": host["embed"], "model.norm.weight": host["final_norm"]}
    if host["lm_head"] is not None:
        out["lm_head.weight"] = host["lm_head"].T
    for param, (suffix, kind) in LAYER_KEYS.items():
        stacked = host["layers"][param]
        for i in range(cfg.num_hidden_layers):
            out[f"model.layers.{i}.{suffix}"] = stacked[i].T if kind == "transposed" else stacked[i]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _vision_tensors(tower: VisionTower, prefix: str = VISION_PREFIXES[0]) -> dict[str, np.ndarray]:
    cfg = tower.config
    out = {}
    for param, (suffix, kind) in VISION_KEYS.items():
        t = np.asarray(jax.device_get(getattr(tower, param)[...]))
        out[prefix + suffix] = _to_hf(t, kind, _vision_hf_shape(kind, t.shape, cfg))
    for param, (suffix, kind) in VISION_BLOCK_KEYS.items():
        stacked = np.asarray(jax.device_get(getattr(tower.blocks, param)[...]))
        for i in range(cfg.depth):
            out[f"{prefix}blocks.{i}.{suffix}"] = _to_hf(stacked[i], kind, stacked[i].shape[::-1])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_pretrained(model: Qwen2, path: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json and safetensors (sharded above max_shard_bytes) in HF layout.

    The files are written to a temporary sibling directory that replaces `path` only when
    complete, so an interrupted save never leaves a half-written checkpoint behind. In a
    multi-process job call it on every process: all take part in gathering the parameters,
    process 0 writes, and all return once the directory is in place.
    """
    tensors = hf_tensors(model)
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            _write_hf(model, tensors, path, max_shard_bytes)
        multihost_utils.sync_global_devices(f"save_pretrained {path}")
        return
    _write_hf(model, tensors, path, max_shard_bytes)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary sibling directory that replaces `path` once the block completes; an
    exception removes it and leaves `path` as it was (no half-written checkpoint)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = path.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_hf(model: Qwen2, tensors: dict[str, np.ndarray], path: str, max_shard_bytes: int) -> None:
    with atomic_directory(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model.config.to_hf(), f, indent=2)
        shards, current, size = [], {}, 0
        for name in sorted(tensors):
            nbytes = tensors[name].nbytes
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensors[name]
            size += nbytes
        shards.append(current)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, file), metadata=metadata)
                weight_map.update({name: file for name in shard})
            total = sum(t.nbytes for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


__all__ = ["CheckpointError", "ConfigError", "from_pretrained", "save_pretrained", "load_params"]
