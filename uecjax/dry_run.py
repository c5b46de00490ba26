"""What a run needs per device, from the compiler, with no weights allocated.

    python -m uecjax.train --config=configs/math.py --dry_run \
        --config.model.preset=qwen2.5-7b --config.mesh.fsdp=-1 --config.mesh.data=1 \
        [--dry_run_devices=64]

builds the model abstractly (`nnx.eval_shape`), compiles the train step for one update's
mini-batch on the configured mesh, and prints per device the parameter, optimizer-state,
reference, batch, temporary and code bytes with a total, then one JSON line. The shape comes
from config.model.preset, else config.model.path (weights are not read), else the embedded
task's tiny model; a Qwen2.5-VL is compiled whole, one image per row. `--dry_run_devices=N`
compiles for N simulated CPU devices (`simulate_cpu_devices`): bytes exact, temporaries an
estimate. Details: docs/DESIGN.md, "The dry run".
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from uecjax.batch import Batch
from uecjax.config import ConfigValueError, derive, lora_from_config, validate
from uecjax.control import init_control_state
from uecjax.models import Qwen2, Qwen2_5_VL, VLConfig
from uecjax.models.lora_init import add_lora
from uecjax.models.presets import parameter_count
from uecjax.models.vision import VisionLayout, padded_vision_layout
from uecjax.offload import host_memory_supported
from uecjax.packing import Packing, packed_rows_bucket
from uecjax.setup import model_config, run_mesh
from uecjax.parallel.mesh import check_batch_size, check_model_mesh
from uecjax.train_step import TrainStep
from uecjax.vision_inputs import patch_bucket, resized_size


def simulate_cpu_devices(n: int) -> None:
    """Run on n simulated CPU devices. Must come before anything touches a device."""
    if n < 1:
        raise ValueError(f"--dry_run_devices={n}: must be >= 1")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree, dtype=None) -> int:
    """Bytes of one device's shard of every array in an abstract, sharded tree (the largest
    shard where the split is uneven: what the fullest device holds); dtype: as if every array
    were stored in it."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(dtype or x.dtype).itemsize
    return total


def group_bytes(tree, group: str) -> int:
    """`device_bytes` of the leaves under a top-level parameter group (e.g. "visual"), in a
    parameter tree or an optimizer state that mirrors one."""
    leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if any(getattr(k, "key", None) == group for k in path)]
    return device_bytes(leaves)


def dry_run_image(config: VLConfig, cfg: ml_collections.ConfigDict, prompt_len: int) -> dict:
    """The one image each dry-run row carries: config.vision.dry_run_pixels (0: min_pixels) of
    a square image, resized as the processor does; its grid, patch bucket and image tokens."""
    vision = config.vision
    pixels = cfg.vision.dry_run_pixels or cfg.vision.min_pixels
    side = max(1, round(math.sqrt(pixels)))
    h, w = resized_size(side, side, vision, min_pixels=cfg.vision.min_pixels,
                        max_pixels=cfg.vision.max_pixels)
    grid = (1, h // vision.patch_size, w // vision.patch_size)
    patches = math.prod(grid)
    tokens = patches // vision.spatial_merge_size**2
    if tokens + 2 > prompt_len:  # + <|vision_start|>, <|vision_end|>
        raise ConfigValueError(
            f"config.vision.dry_run_pixels={cfg.vision.dry_run_pixels}: an image of {h}x{w} pixels "
            f"takes {tokens} image tokens (+ 2 around them), more than "
            f"rollout.max_prompt_len={prompt_len}; every such prompt would be skipped. Raise "
            "rollout.max_prompt_len or lower the pixels (vision.max_pixels)")
    return dict(pixels=pixels, image_hw=[h, w], grid_thw=list(grid), patches=patches,
                patch_bucket=patch_bucket(patches), image_tokens=tokens)


def abstract_packing(rows: int, prompt_len: int, response_len: int, spec, fill: float, sharding):
    """The packed layout (`uecjax.packing.pack`) of rows whose sequences fill `fill` of the
    padded slots, as ShapeDtypeStructs: each block gets as many packed rows as its tokens
    need at that fill (first-fit's waste not counted), bucketed as `pack` buckets them."""
    L = spec.tokens_per_row or prompt_len + response_len - 1
    blocks = spec.shards * spec.micro_batches
    b = rows // blocks
    needed = math.ceil(b * fill * (prompt_len + response_len - 1) / L)
    p = packed_rows_bucket(needed, b)
    sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding)  # noqa: E731
    slots = (blocks * p, L)
    return Packing(sds(slots), sds(slots), sds((rows, response_len)), spec.shards,
                   head_on_slots=blocks * p * L < rows * response_len)


def abstract_batch(rows: int, prompt_len: int, response_len: int, with_ref: bool, sharding,
                   vision=None, token_weight: bool = False, packing=None) -> Batch:
    """The loop's batch (`uecjax.batch.host_batch`) as ShapeDtypeStructs on the batch sharding.

    token_weight: the rows carry per-token importance weights (loss.explore_is_cap > 0).
    vision: None for text rows, else (VisionConfig, image_grid_thw [k, 3] of each row's images,
    patch bucket N): M-RoPE positions [rows, 3, T], pixel values [rows, N, patch_dim] and the
    rows' `padded_vision_layout`s, as `uecjax.vision_inputs.vision_rows` gives them.
    """
    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    T = prompt_len + response_len
    tok, resp, seq = (rows, T), (rows, response_len), (rows,)
    images = {}
    if vision is not None:
        config, grid, N = vision
        layout = padded_vision_layout(np.asarray(grid), config, N)  # shapes depend on N alone
        images = dict(pixel_values=sds((rows, N, config.patch_dim), jnp.float32),
                      vision=VisionLayout(*jax.tree.map(lambda x: sds((rows, *x.shape), x.dtype),
                                                        tuple(layout))))
    return Batch(tokens=sds(tok, jnp.int32), attention_mask=sds(tok, jnp.int32),
                 positions=sds((rows, 3, T) if images else tok, jnp.int32),
                 response_mask=sds(resp, jnp.float32),
                 advantages=sds(seq, jnp.float32), success_rate=sds(seq, jnp.float32),
                 is_hard=sds(seq, jnp.float32), old_logp=sds(resp, jnp.float32),
                 old_entropy=sds(resp, jnp.float32),
                 ref_logp=sds(resp, jnp.float32) if with_ref else None,
                 sampler_logp=sds(resp, jnp.float32), explore=sds(seq, jnp.float32),
                 token_weight=sds(resp, jnp.float32) if token_weight else None, packing=packing,
                 **images)


def dry_run(cfg: ml_collections.ConfigDict, devices=None, *, out=sys.stdout) -> dict:
    """Compiles the configured train step abstractly; prints and returns the memory report."""
    validate(cfg, dry_run=True)
    config = model_config(cfg)
    is_vl = isinstance(config, VLConfig)
    text = config.text if is_vl else config
    mesh = run_mesh(cfg, devices)
    warnings = check_model_mesh(config, mesh)
    lora = lora_from_config(cfg)
    frozen = ("visual",) if is_vl and cfg.model.freeze_vision and lora is None else ()
    derived = derive(cfg, frozen)  # as the training loop builds them
    loss_cfg, rollout_cfg, optim = derived.loss_cfg, derived.rollout_cfg, derived.optim_cfg
    rows = rollout_cfg.batch_rows // cfg.train.updates_per_rollout  # one update's mini-batch (uecjax.updates)
    check_batch_size(rows, mesh, cfg.train.micro_batches)
    image = dry_run_image(config, cfg, rollout_cfg.max_prompt_len) if is_vl else None

    cls = Qwen2_5_VL if is_vl else Qwen2
    def build():
        model = cls(config, rngs=nnx.Rngs(0))
        return model if lora is None else add_lora(model, lora, seed=cfg.seed)

    model = nnx.eval_shape(build)  # shapes only, no weights
    trainer = TrainStep(model, loss_cfg, optim, mesh, micro_batches=cfg.train.micro_batches,
                        chunk_size=cfg.train.chunk_size, pack=cfg.train.pack,
                        tokens_per_row=cfg.train.tokens_per_row)
    params = _abstract(trainer.trainable(model), trainer.param_shardings)  # LoRA: the adapters
    base = None if lora is None else _abstract(trainer.base, trainer.base_shardings)
    weights = params if lora is None else base  # the model's own weights (vision tower included)
    opt_state = _abstract(jax.eval_shape(trainer.optimizer.init, params), trainer.opt_shardings)
    control = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=trainer.replicated),
                           jax.eval_shape(lambda: init_control_state(loss_cfg, cfg.seed)))
    vision = (config.vision, [image["grid_thw"]], image["patch_bucket"]) if is_vl else None
    packing = None if trainer.pack_spec is None else abstract_packing(
        rows, rollout_cfg.max_prompt_len, rollout_cfg.max_new_tokens, trainer.pack_spec,
        cfg.train.dry_run_fill, trainer.batch_sharding)
    batch = abstract_batch(rows, rollout_cfg.max_prompt_len, rollout_cfg.max_new_tokens, loss_cfg.beta > 0,
                           trainer.batch_sharding, vision, token_weight=loss_cfg.explore_is_cap > 0,
                           packing=packing)

    step_lowered, logprobs_lowered = trainer.lower(params, opt_state, control, batch, base)
    step = step_lowered.compile().memory_analysis()
    logprobs = logprobs_lowered.compile().memory_analysis()

    if lora is not None:  # the reference is the base with zeroed adapters: adapter-sized
        reference = device_bytes(params) if loss_cfg.beta > 0 else 0
    else:  # a second copy of the parameters, stored in the compute dtype (uecjax.loop.
        # build_run: it is only ever read in it), unless parked in host memory
        reference = (device_bytes(params, cfg.model.dtype)
                     if loss_cfg.beta > 0 and not _offloads(cfg, mesh) else 0)
    per_device = {
        "params": device_bytes(params),  # the trained parameters (LoRA: the adapters)
        "frozen_params": 0 if base is None else device_bytes(base),  # LoRA: the base weights
        "optimizer_state": device_bytes(opt_state),
        "reference_params": reference,
        "batch": device_bytes(batch),
        "temp": int(step.temp_size_in_bytes),
        "generated_code": int(step.generated_code_size_in_bytes),
    }
    per_device["total"] = sum(per_device.values())
    report = {
        "dry_run": True,
        "model": cfg.model.preset or cfg.model.path or cfg.data.kind,  # an embedded task's model
        "parameters": parameter_count(config),
        "vision_params": _count(weights["visual"]) if is_vl else 0,
        "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha,
                                           "targets": list(lora.targets), "params": _count(params)},
        "platform": mesh.devices.flat[0].platform,
        "devices": int(mesh.size),
        "mesh": dict(mesh.shape),
        "batch": {"rows": rows, "prompt_len": rollout_cfg.max_prompt_len,
                  "response_len": rollout_cfg.max_new_tokens, "micro_batches": cfg.train.micro_batches},
        # The packed layout compiled (train.pack): packed rows of tokens_per_row slots per
        # (batch shard, micro-batch) block, for sequences filling `fill` of the padded slots.
        "packing": None if packing is None else {
            "fill": cfg.train.dry_run_fill, "tokens_per_row": packing.tokens_per_row,
            "rows_per_block": rows // (packing.shards * cfg.train.micro_batches),
            "packed_rows_per_block": packing.source.shape[0] // (packing.shards * cfg.train.micro_batches),
            "head_on_slots": packing.head_on_slots},
        "dtype": text.dtype, "param_dtype": text.param_dtype,
        "state_dtype": optim.state_dtype or text.param_dtype, "remat": text.remat,
        "method": cfg.method,
        "per_device_bytes": per_device,
        # Forward-only old / reference log-prob pass: what it holds besides params and batch.
        "logprob_pass_temp_bytes": int(logprobs.temp_size_in_bytes),
        # The tower's share of the per-device figures above, and the dry run's images.
        "vision": None if not is_vl else {
            "params": _count(weights["visual"]), "frozen": bool(frozen) or lora is not None,
            "param_bytes": group_bytes(weights, "visual"),
            "optimizer_state_bytes": group_bytes(opt_state, "visual"),
            "reference_bytes": (device_bytes(weights["visual"], cfg.model.dtype)
                                if per_device["reference_params"] and lora is None else 0),
            "images_per_row": 1, **image},
        "compiler": {"argument_bytes": int(step.argument_size_in_bytes),
                     "output_bytes": int(step.output_size_in_bytes),
                     "alias_bytes": int(step.alias_size_in_bytes)},
        "warnings": warnings,
    }
    _print(report, out)
    return report


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _offloads(cfg, mesh) -> bool:
    if not cfg.model.offload_reference or mesh.devices.flat[0].platform == "cpu":
        return False
    return host_memory_supported([jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())])


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f} GiB"


def _print(report: dict, out) -> None:
    if out is None:
        return
    b = report["per_device_bytes"]
    n = report["parameters"]
    count = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    print(f"dry run: {report['model']} ({count} parameters), "
          f"{report['method']}, remat {report['remat']}, params {report['param_dtype']}, "
          f"moments {report['state_dtype']}", file=out)
    print(f"  mesh {report['mesh']} on {report['devices']} {report['platform']} devices; batch "
          f"{report['batch']['rows']} rows x ({report['batch']['prompt_len']} + "
          f"{report['batch']['response_len']}) tokens, {report['batch']['micro_batches']} "
          "micro-batches", file=out)
    pk = report["packing"]
    if pk:
        print(f"  packed: {pk['packed_rows_per_block']} rows of {pk['tokens_per_row']} slots per "
              f"{pk['rows_per_block']} rows of a (shard, micro-batch) block, for sequences filling "
              f"{pk['fill']:.0%} of the padded slots (train.dry_run_fill)", file=out)
    lo = report["lora"]
    if lo:
        print(f"  LoRA rank {lo['rank']} on {','.join(lo['targets'])}: {lo['params']:,} trained "
              "parameters; the base weights are frozen", file=out)
    print("  per device:", file=out)
    rows = (("params", "parameters (LoRA adapters)" if lo else "parameters"),)
    rows += (("frozen_params", "frozen base weights"),) if lo else ()
    for key, label in (*rows, ("optimizer_state", "optimizer state"),
                       ("reference_params", "reference parameters"), ("batch", "batch"),
                       ("temp", "activations / temporaries"), ("generated_code", "generated code"),
                       ("total", "total")):
        print(f"    {label:27s} {_gib(b[key])}", file=out)
    print(f"  log-prob pass (forward only) temporaries {_gib(report['logprob_pass_temp_bytes'])}",
          file=out)
    v = report["vision"]
    if v:
        print(f"  vision tower: {v['params'] / 1e6:.1f}M parameters ({'frozen' if v['frozen'] else 'trained'}); "
              f"per device {_gib(v['param_bytes']).strip()} of the parameters, "
              f"{_gib(v['optimizer_state_bytes']).strip()} of the optimizer state, "
              f"{_gib(v['reference_bytes']).strip()} of the reference", file=out)
        print(f"  images: {v['images_per_row']} per row, {v['pixels']} px square resized to "
              f"{v['image_hw'][0]}x{v['image_hw'][1]} = {v['patches']} patches, padded to "
              f"{v['patch_bucket']}; {v['image_tokens']} image tokens of the "
              f"{report['batch']['prompt_len']}-token prompt", file=out)
    for w in report["warnings"]:
        print(f"  warning: {w}", file=out)
    print(json.dumps(report), file=out, flush=True)


__all__ = ["abstract_batch", "device_bytes", "dry_run", "dry_run_image", "group_bytes",
           "simulate_cpu_devices"]
