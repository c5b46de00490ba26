"""Device mesh and the one set of partition rules for parameters, optimizer state and batches.

    mesh = make_mesh((-1, 1, 1))                      # data x fsdp x tensor; -1 = the rest
    shardings = param_shardings(mesh, params)         # params: nnx.State of the model
    opt_shardings = opt_state_shardings(mesh, optimizer, params, shardings)
    model = from_pretrained(path, sharding_fn=model_sharding_fn(mesh, config))

`LOGICAL_RULES` maps the models' logical axis names and "batch" to mesh axes (weights over
`fsdp` along the hidden axis and `tensor` along heads / MLP / vocabulary; batches over data x
fsdp); optimizer-state leaves take their parameter's sharding. A dimension its axes do not
divide is replicated (`param_fallbacks`); `check_model_mesh` makes the costly fallbacks errors
before anything loads. `global_batch` places host batches that every process holds whole
(`uecjax.parallel.hosts`, those of which each holds its own rows). docs/DESIGN.md, "The mesh
and the partition rules".
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
import optax
from optax.transforms import MaskedNode
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uecjax.models.config import VLConfig
from uecjax.models.qwen2 import LAYER_PARAM_AXES, MODEL_PARAM_AXES, Qwen2
from uecjax.models.qwen2_5_vl import Qwen2_5_VL
from uecjax.models.vision import BLOCK_PARAM_AXES, TOWER_PARAM_AXES

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
LOGICAL_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "layers": None,  # the scan axis over layers stays whole on every device
    # A LoRA adapter's rank axis: whole where the factor's other axis is split over fsdp,
    # split over fsdp where it is not (uecjax.models.lora.adapter_axes).
    "lora": None,
    "lora_fsdp": "fsdp",
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    # The Qwen2.5-VL vision tower (uecjax.models.vision): stored FSDP-style along its hidden
    # axes (0.67B parameters: replicated, its float32 weights and Adam moments would take
    # 7.5 GiB on every device); heads and MLP stay whole, the tower's compute is small.
    "vision_patch": None,
    "vision_embed": "fsdp",
    "vision_heads": None,
    "vision_mlp": None,
    "vision_merge": "fsdp",
}


class ShardingError(ValueError):
    """A mesh or batch shape that cannot be laid out on the devices; the message says why."""


# ---- mesh ----

def mesh_shape(axes: Sequence[int] | Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves (data, fsdp, tensor) sizes, where one -1 takes the rest of the devices."""
    if isinstance(axes, Mapping):
        unknown = set(axes) - set(MESH_AXES)
        if unknown:
            raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
        axes = [axes.get(name, 1) for name in MESH_AXES]
    sizes = [int(a) for a in axes]
    if len(sizes) != len(MESH_AXES):
        raise ShardingError(f"mesh {tuple(sizes)}: give one size per axis {MESH_AXES}")
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh {tuple(sizes)}: sizes must be >= 1, with at most one -1 (the rest)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ShardingError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                f"divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {known} devices, but {num_devices} are "
            "available; use -1 on one axis to take the rest")
    return tuple(sizes)


def make_mesh(axes: Sequence[int] | Mapping[str, int] = (-1, 1, 1), devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(axes, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---- logical axes -> PartitionSpec ----

def _axis_size(mesh: Mesh, axes) -> int:
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def partition_spec(logical_axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping = LOGICAL_RULES) -> tuple[P, list[str]]:
    """PartitionSpec for an array with these logical axes and shape, plus the fallbacks taken.

    A dimension whose mesh axes do not divide it (or whose mesh axis another dimension already
    uses) is replicated; each such case is described in the returned list.
    """
    if len(logical_axes) != len(shape):
        raise ShardingError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    spec, used, fallbacks = [], set(), []
    for name, dim in zip(logical_axes, shape):
        if name not in rules:
            raise ShardingError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        mesh_axes = rules[name]
        if mesh_axes is None:
            spec.append(None)
            continue
        group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        size = _axis_size(mesh, group)
        if used & set(group):
            fallbacks.append(f"{name}: mesh axes {group} already used by another dimension")
            spec.append(None)
        elif dim % size:
            fallbacks.append(f"{name}={dim} is not divisible by {group} (size {size}); replicated")
            spec.append(None)
        else:
            used |= set(group)
            spec.append(mesh_axes)
    return P(*spec), fallbacks


def _path_names(path) -> list[str]:
    """Dict keys of a state path (nnx.Variable adds a trailing `.value` attribute key)."""
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def param_logical_axes(path: Sequence) -> tuple[str, ...]:
    """Logical axes of a model parameter from its state path, e.g. ('layers', 'q_w'); a
    Qwen2_5_VL's are under 'language_model' (the decoder) and 'visual' (the vision tower)."""
    keys = _path_names(path)
    if keys[0] == "visual":
        table = BLOCK_PARAM_AXES if keys[1] == "blocks" else TOWER_PARAM_AXES
    else:
        text_keys = keys[1:] if keys[0] == "language_model" else keys
        table = LAYER_PARAM_AXES if text_keys[0] == "layers" else MODEL_PARAM_AXES
    if keys[-1] not in table:
        raise ShardingError(f"parameter {'/'.join(keys)} has no logical axes in uecjax.models")
    return table[keys[-1]]


def param_shardings(mesh: Mesh, params, rules: Mapping = LOGICAL_RULES):
    """NamedShardings with the structure of `params` (an nnx.State, arrays or ShapeDtypeStructs)."""
    def one(path, x):
        return NamedSharding(mesh, partition_spec(param_logical_axes(path), x.shape, mesh, rules)[0])
    return jax.tree_util.tree_map_with_path(one, params)


def param_fallbacks(mesh: Mesh, params, rules: Mapping = LOGICAL_RULES) -> dict[str, list[str]]:
    """Parameter path -> the replication fallbacks its layout takes on this mesh (empty: none)."""
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        found = partition_spec(param_logical_axes(path), x.shape, mesh, rules)[1]
        if found:
            out[jax.tree_util.keystr(path)] = found
    return out


def opt_state_shardings(mesh: Mesh, optimizer: optax.GradientTransformation, params, shardings):
    """Shardings of `optimizer.init(params)`: parameter-shaped leaves (Adam moments) take the
    parameter's sharding, everything else (counts, scalars) is replicated."""
    abstract = jax.eval_shape(optimizer.init, params)
    # Frozen groups (optax.multi_transform) leave MaskedNode placeholders, with no arrays.
    masked = lambda x: isinstance(x, MaskedNode)  # noqa: E731
    return optax.tree_map_params(optimizer, lambda v, s: v if masked(v) else s, abstract, shardings,
                                 transform_non_params=lambda _: replicated(mesh), is_leaf=masked)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, other axes whole; valid for arrays of any rank."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    return _axis_size(mesh, BATCH_AXES)


def process_rows(sharding: NamedSharding, num_rows: int) -> list[slice]:
    """The row blocks of a [num_rows, ...] array that this process's devices hold, in order."""
    blocks = {(s.start or 0, num_rows if s.stop is None else s.stop)
              for s, *_ in sharding.addressable_devices_indices_map((num_rows,)).values()}
    return [slice(a, b) for a, b in sorted(blocks)]


def global_batch(tree, sharding: NamedSharding):
    """Host (numpy) arrays with a leading row axis -> global jax Arrays on `sharding`.

    Every process holds the same host arrays and passes only its own rows to
    `jax.make_array_from_process_local_data`; jax Arrays and None pass through unchanged.
    """
    def one(x):
        if x is None or isinstance(x, jax.Array):
            return x
        x = np.asarray(x)
        local = np.concatenate([x[rows] for rows in process_rows(sharding, x.shape[0])])
        return jax.make_array_from_process_local_data(sharding, local, x.shape)
    return jax.tree.map(one, tree)


def put_replicated(tree, sharding: NamedSharding):
    """Small host values, the same on every process -> global arrays on a replicated sharding.

    Unlike `jax.device_put`, which in a multi-process job all-gathers the values to check
    that every process passed the same (and fails on NaN, which never equals itself, e.g. an
    unset H_0), this trusts the caller: the values come from the same computation everywhere.
    """
    def one(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.tree.map(one, tree)


def check_batch_size(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
    """Every micro-batch must split evenly over the data-parallel devices."""
    shards = batch_shards(mesh)
    if batch_size % (micro_batches * shards):
        raise ShardingError(
            f"batch size {batch_size} must be a multiple of micro_batches ({micro_batches}) x "
            f"data x fsdp ({shards}) = {micro_batches * shards}")


# ---- the model against the mesh ----

def check_model_mesh(config, mesh: Mesh, *, where: str = "config.mesh") -> list[str]:
    """Raises ShardingError when the mesh cannot split the model evenly; returns warnings.

    `config` is a `uecjax.models.TextConfig`, or a `VLConfig` (its decoder is checked: the
    vision tower takes no `tensor` split, and its fsdp-split hidden axes fall back to replicated
    where fsdp does not divide them, see LOGICAL_RULES). Errors: attention heads, KV heads or MLP
    width not divisible by `tensor`, hidden size not divisible by `fsdp` (the parameter would be
    silently replicated, or a head split across devices). Warnings: a vocabulary not divisible
    by `tensor` (the embedding / lm-head are then replicated over `tensor`; docs/DESIGN.md,
    "The mesh and the partition rules").
    """
    if isinstance(config, VLConfig):
        config = config.text
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    needs = (("tensor", tensor, "num_attention_heads", config.num_attention_heads),
             ("tensor", tensor, "num_key_value_heads", config.num_key_value_heads),
             ("tensor", tensor, "intermediate_size", config.intermediate_size),
             ("fsdp", fsdp, "hidden_size", config.hidden_size))
    for axis, size, field, value in needs:
        if value % size:
            fits = [d for d in range(1, value + 1) if value % d == 0 and d <= mesh.size]
            raise ShardingError(
                f"{where}.{axis}={size} does not divide the model's {field}={value}; choose a "
                f"{axis} size that divides it ({', '.join(map(str, fits))})")
    warnings = []
    if config.vocab_size % tensor:
        warnings.append(
            f"vocab_size={config.vocab_size} is not divisible by {where}.tensor={tensor}: the "
            "embedding and lm-head are replicated over the tensor axis (more memory per device)")
    return warnings


# ---- loading ----

def model_sharding_fn(mesh: Mesh, config, rules: Mapping = LOGICAL_RULES):
    """`sharding_fn(name, logical_axes)` for `uecjax.models.from_pretrained`, laid out as
    `param_shardings` does. The shapes (for the divisibility fallback) come from `config`
    (a TextConfig, or a VLConfig for a Qwen2_5_VL)."""
    cls = Qwen2_5_VL if isinstance(config, VLConfig) else Qwen2
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0)))
    shapes = {}
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(abstract, nnx.Param)):
        shapes["/".join(_path_names(path))] = x.shape

    def sharding_fn(name: str, logical_axes: tuple) -> NamedSharding:
        if name not in shapes:
            raise ShardingError(f"parameter {name!r} is not in a Qwen2 of this config")
        return NamedSharding(mesh, partition_spec(logical_axes, shapes[name], mesh, rules)[0])

    return sharding_fn
