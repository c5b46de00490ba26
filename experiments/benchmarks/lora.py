"""LoRA benchmark (issue 17): memory per device, train-step throughput and the sampler, full
fine-tuning against LoRA r=64; adapters applied unmerged against merged into the weights.

    # everything (CPU: the dry runs compile the 7B presets abstractly, ~10 min in all)
    python experiments/benchmarks/lora.py --out experiments/benchmarks/results/lora_cpu.jsonl
    # parts
    python experiments/benchmarks/lora.py --skip_train --skip_sampler     # dry runs only
    python experiments/benchmarks/lora.py --skip_dry_run                  # CPU timings only
    # smoke run (tests/test_bench_lora.py): tiny presets, one repeat, no 7B dry run
    python experiments/benchmarks/lora.py --quick

One JSON line per figure and case, each with "bench": "lora" and "figure". Nothing is
downloaded: shapes are `uecjax.models.presets`, weights random. LoRA is r = --rank (64),
alpha = --alpha (128), on every decoder projection (q, k, v, o, gate, up, down).

Figures
-------
dry_run     `uecjax.dry_run.dry_run` (no weights allocated: the compiler's per-device bytes)
            for qwen2.5-vl-7b with configs/geo3k.py's settings (vision tower and one 512^2
            image per row included; full fine-tuning trains the tower as that config does,
            LoRA freezes it with the rest of the base) and for qwen2.5-7b with
            configs/math.py's, each full fine-tuning and LoRA, on 1 device and on 8 (mesh
            fsdp=8, data=1), as 8 simulated CPU devices (`simulate_cpu_devices`, in a child
            process). Full and LoRA share every batch setting. An update's rows must split
            over the devices: on 8 the rollout grows by whole batches (geo3k: 32 prompts, 40
            rows an update) and micro_batches halves until rows % (micro_batches x 8) == 0
            (geo3k: 5, one row per device per micro-batch; math: 8), as
            experiments/benchmarks/scale.py's dry runs do. Nothing else is reduced: full
            rollout lengths (geo3k 2048 + 2048, math 1024 + 2048). per_device_gib: every
            per_device_bytes entry in GiB (params: the trained parameters, LoRA: the adapters;
            frozen_params: LoRA's frozen base; reference_params: full fine-tuning's bf16 copy,
            LoRA's adapter-sized zeroed copy); each LoRA line carries lora_over_full, the
            ratio of its total (and of each entry) to the matching full line's. Temporaries
            are the CPU compiler's estimate, an approximation of the GPU / TPU compilers'.
train_step  `uecjax.train_step.TrainStep` on CPU-sized shapes (experiments/benchmarks/scale.py's
            CPU example: real widths of qwen2.5-0.5b / 1.5b, --layers 2 layers, 2 rows x
            (32 + 32) tokens, float32, remat full, uec, beta 0), full fine-tuning and LoRA on
            the same batch: step_s the best of --train_repeats steps after a warm-up step,
            tokens_per_s = rows x (prompt + response) / step_s, lora_over_full (tokens/s) in
            the LoRA line. At 2 layers the tied embedding (136M / 233M parameters) is most of
            the model, and full fine-tuning computes its gradient and Adam update every step,
            so the CPU ratio overstates what LoRA saves at real depth; both lines say the
            trained and total parameter counts.
sampler     `uecjax.sampler.Sampler` on a LoRA model (adapters applied unmerged, B != 0) and on
            a plain model whose weights are W + (alpha / r) A B (`merge_layer_arrays`), same
            prompts, greedy and temperature 1, no stop token: end-to-end tokens/s, best of
            --repeats calls after a warm-up call, ratio unmerged / merged, and how many greedy
            tokens the two agree on. merge: the time to merge once on device (a jitted
            W + s A B of the stacked arrays, best of --repeats after a compile), at the
            benchmark's depth and at the shape's real depth (random arrays), with the bytes of
            the merged copy that a merged sampler would hold next to the training base.
cpu_bf16_temp  the compiled temporaries of a scan over frozen float32 and bfloat16 stacked
            weights (bf16 compute) on the CPU: why a bfloat16 base (configs/geo3k_lora.py)
            shows more temporaries in CPU dry runs than a float32 one.

Choice (the issue's "merged once per step, or applied unmerged: measure both and pick"): the
library applies the adapters unmerged everywhere (uecjax.models.lora); the sampler line's
unmerged_over_merged and merge_s figures are the measurement behind it.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALE = os.path.join(REPO, "experiments", "benchmarks", "scale.py")

DRY_RUN_CASES = (("qwen2.5-vl-7b", "configs/geo3k.py"), ("qwen2.5-7b", "configs/math.py"))
# --quick: the toy presets, short rollouts, LoRA rank 4 (rank 64 would exceed tiny's width 64),
# dry runs on 8 devices only (the sharded case; half the compile time of 1 and 8).
QUICK = dict(train_shapes="tiny", train_rows=2, train_prompt=16, train_response=16,
             train_repeats=1, sampler_shape="tiny", sampler_batch=2, sampler_prompt=16,
             new_tokens=8, repeats=1, rank=4, alpha=8.0, dry_run_devices="8")
QUICK_DRY_RUN_CASES = (("tiny", "configs/math.py"),)
GIB = 2**30


OUT = []  # the --out file, when given (the parent process writes the child's lines too)


def write_line(line: str):
    print(line, flush=True)
    for f in OUT:
        f.write(line + "\n")
        f.flush()


def emit(**fields):
    write_line(json.dumps({"bench": "lora", **fields}))


def load_file(path: str, name: str):
    """A Python file as a module (config files and the other benchmarks are not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scale():
    """experiments/benchmarks/scale.py (its shapes, builders, timers, train batch)."""
    return load_file(SCALE, "bench_scale")


def lora_spec(args):
    from uecjax.models.lora import LoraSpec

    return LoraSpec(rank=args.rank, alpha=args.alpha)


# ---- dry runs --------------------------------------------------------------------------------

def load_config(path: str):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return load_file(os.path.join(REPO, path), "_lora_bench_config").get_config()


def dry_run_cfg(name: str, config: str, devices: int, lora: bool, args):
    """The config file's settings for preset `name` on `devices` devices (fsdp), full or LoRA."""
    c = load_config(config)
    c.model.preset = name
    c.mesh.data, c.mesh.fsdp = 1, devices
    notes = []
    if args.quick:  # the toy presets: short rollouts, small images
        c.rollout.max_prompt_len, c.rollout.max_new_tokens = 64, 32
        c.vision.min_pixels = c.vision.dry_run_pixels = 56 * 56
        c.model.dtype = "float32"
        notes.append("quick: rollout 64 + 32 tokens, 56x56 images, float32")
    prompts_config = c.rollout.prompts_per_batch
    per_prompt = c.rollout.group_size / c.train.updates_per_rollout
    prompts, micro = prompts_config, c.train.micro_batches
    while int(prompts * per_prompt) % devices:  # an update's rows split over the devices
        prompts += prompts_config
    while micro > 1 and int(prompts * per_prompt) % (micro * devices):
        micro //= 2
    c.rollout.prompts_per_batch, c.train.micro_batches = prompts, micro
    if lora:
        c.model.lora.rank, c.model.lora.alpha = args.rank, float(args.alpha)
        c.model.lora.targets = "q,k,v,o,gate,up,down"
    return c, dict(prompts_per_batch=prompts, prompts_per_batch_config=prompts_config,
                   micro_batches=micro, notes=notes)


def cpu_bf16_temp():
    """Why a bfloat16 base shows more temporaries than a float32 one in CPU dry runs: the
    compiled temporaries of the gradient of an 8-layer scan of 2048 x 2048 weights (frozen,
    cast to bf16 compute) with respect to a float32 adapter-like matrix, for float32 and
    bfloat16 stored weights."""
    import jax
    import jax.numpy as jnp

    layers, width, rows = 8, 2048, 512

    def f(w, x, a):
        def body(h, wl):
            y = h @ wl.astype(jnp.bfloat16) + h @ a.astype(jnp.bfloat16)
            return jnp.tanh(y), None

        h, _ = jax.lax.scan(jax.checkpoint(body), x, w)
        return h.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(f, argnums=2))
    line = dict(figure="cpu_bf16_temp", layers=layers, width=width, rows=rows)
    for dtype in (jnp.float32, jnp.bfloat16):
        w = jax.ShapeDtypeStruct((layers, width, width), dtype)
        x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16)
        a = jax.ShapeDtypeStruct((width, width), jnp.float32)
        memory = grad.lower(w, x, a).compile().memory_analysis()
        name = jnp.dtype(dtype).name
        line[f"{name}_weight_bytes"] = layers * width * width * jnp.dtype(dtype).itemsize
        line[f"{name}_temp_bytes"] = int(memory.temp_size_in_bytes)
    emit(**line)


def dry_runs_child(args):
    """Runs in a child process: 8 simulated CPU devices, one `dry_run` per case."""
    from uecjax.dry_run import simulate_cpu_devices

    simulate_cpu_devices(max(args.dry_run_device_counts))
    import jax

    from uecjax.dry_run import dry_run

    cpu_bf16_temp()

    cases = QUICK_DRY_RUN_CASES if args.quick else DRY_RUN_CASES
    for name, config in cases:
        for n in args.dry_run_device_counts:
            full = None
            for lora in (False, True):
                cfg, sizing = dry_run_cfg(name, config, n, lora, args)
                start = time.perf_counter()
                try:
                    report = dry_run(cfg, jax.devices()[:n], out=None)
                except Exception as e:  # noqa: BLE001 (one failed case is reported, the rest run)
                    emit(figure="dry_run", model=name, config=config, devices=n,
                         mode="lora" if lora else "full", error=f"{type(e).__name__}: {e}"[-2000:],
                         wall_s=round(time.perf_counter() - start, 1), **sizing)
                    continue
                wall = round(time.perf_counter() - start, 1)
                per = report["per_device_bytes"]
                line = dict(figure="dry_run", model=name, config=config, devices=n,
                            mode="lora" if lora else "full", wall_s=wall, **sizing,
                            per_device_gib={k: round(v / GIB, 3) for k, v in per.items()})
                for k, v in report.items():  # the dry run's whole report ("model", "devices": the same)
                    if k != "dry_run":
                        line.setdefault(k, v)
                if lora and full is not None:
                    fp = full["per_device_bytes"]
                    line["lora_over_full"] = {k: (round(per[k] / fp[k], 4) if fp[k] else None)
                                              for k in per}
                    line["lora_over_full_total"] = round(per["total"] / fp["total"], 4)
                if not lora:
                    full = report
                emit(**line)
                gc.collect()


def start_dry_runs(argv):
    """The dry-run figure in a child process (simulated devices must be set before JAX starts;
    the timings in this process keep the one real CPU device). Its lines are passed on
    whole when it ends (it may run alongside the timings)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--_dry_run_child", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def finish_dry_runs(child, args):
    try:
        out, _ = child.communicate(timeout=args.dry_run_timeout)
        code = child.returncode
    except subprocess.TimeoutExpired:
        child.kill()
        out, _ = child.communicate()
        code = "killed after --dry_run_timeout"
    for line in out.splitlines():
        write_line(line)
    if code:
        emit(figure="dry_run", error=f"the dry-run child exited with {code}")


# ---- train step ------------------------------------------------------------------------------

def bench_train(scale, name, args):
    import jax

    from uecjax.models.lora_init import add_lora
    from uecjax.models.presets import parameter_count
    from uecjax.objectives.methods import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.parallel.mesh import make_mesh
    from uecjax.train_step import TrainStep

    sargs = argparse.Namespace(dtype="float32", param_dtype="float32", remat="full",
                               layers=args.layers)
    config, real = scale.shape_config(name, sargs)
    B, P, R = args.train_rows, args.train_prompt, args.train_response
    host_batch = scale.random_train_batch(config, B, P, R)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    spec = lora_spec(args)
    full_tps = None
    for mode in ("full", "lora"):
        model = scale.build_model(config)
        if mode == "lora":
            add_lora(model, spec)
        ts = TrainStep(model, loss_config(args.method, beta=0.0), OptimConfig(learning_rate=1e-6),
                       mesh, micro_batches=1, chunk_size=1024)
        trainable = ts.trainable(model)
        trained = sum(math.prod(x.shape) for x in jax.tree.leaves(trainable))
        # copy=False: the step takes over the buffers (full: the model's; LoRA: the adapters).
        params, opt_state, control = ts.init(trainable, copy=False)
        logp, entropy = ts.compute_logprobs(params, host_batch)
        batch = ts.place_batch(host_batch.replace(old_logp=logp, old_entropy=entropy))

        def step():
            nonlocal params, opt_state, control
            params, opt_state, control, metrics = ts.step(params, opt_state, control, batch)
            return metrics

        metrics, first = scale.timed(step)
        times = [scale.timed(step)[1] for _ in range(args.train_repeats)]
        loss = float(step()["loss"])
        best = min(times)
        tps = B * (P + R) / best
        line = dict(figure="train_step", shape=name, mode=mode, layers=config.num_hidden_layers,
                    real_layers=real.num_hidden_layers, dtype=config.dtype,
                    param_dtype=config.param_dtype, remat=config.remat, method=args.method,
                    rows=B, prompt=P, response=R, tokens_per_step=B * (P + R),
                    parameters=parameter_count(config), trained_parameters=trained,
                    lora=None if mode == "full" else dict(rank=spec.rank, alpha=spec.alpha,
                                                          targets=list(spec.targets)),
                    repeats=args.train_repeats, first_call_s=scale.rounded(first),
                    compile_s=scale.rounded(first - best), step_s=scale.rounded(best),
                    median_step_s=scale.rounded(float(np.median(times))),
                    tokens_per_s=scale.rounded(tps), loss_finite=bool(np.isfinite(loss)))
        if mode == "full":
            full_tps = tps
        else:
            line["lora_over_full"] = scale.rounded(tps / full_tps)
        emit(**line)
        model = ts = params = opt_state = batch = None  # free before the next mode
        gc.collect()


# ---- sampler ---------------------------------------------------------------------------------

def merge_fn(spec):
    """Jitted W + (alpha / r) A B of every adapted stacked weight (float32 math, W's dtype)."""
    import jax
    import jax.numpy as jnp

    from uecjax.models.lora import adapter_names

    @jax.jit
    def merge(arrays):
        out = {}
        for t in spec.targets:
            a, b = adapter_names(t)
            w = arrays[f"{t}_w"]
            delta = jnp.einsum("lir,lro->lio", arrays[a].astype(jnp.float32), arrays[b].astype(jnp.float32))
            out[f"{t}_w"] = (w.astype(jnp.float32) + spec.scale * delta).astype(w.dtype)
        return out

    return merge


def time_merge(scale, merge, arrays, repeats):
    _, first = scale.timed(lambda: merge(arrays))
    best = min(scale.timed(lambda: merge(arrays))[1] for _ in range(max(repeats, 1)))
    return first, best


def real_depth_arrays(config, spec):
    """Random stacked weights and adapters of the targets at the config's depth."""
    import jax
    import jax.numpy as jnp

    from uecjax.models.lora import adapter_names

    H, I, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    dims = {"q": (H, q), "k": (H, kv), "v": (H, kv), "o": (q, H), "gate": (H, I), "up": (H, I),
            "down": (I, H)}
    key = jax.random.key(1)
    arrays = {}
    for i, t in enumerate(spec.targets):
        fan_in, fan_out = dims[t]
        a, b = adapter_names(t)
        k = jax.random.fold_in(key, i)
        arrays[f"{t}_w"] = jax.random.normal(k, (L, fan_in, fan_out), jnp.float32)
        arrays[a] = jax.random.normal(jax.random.fold_in(k, 1), (L, fan_in, spec.rank), jnp.float32)
        arrays[b] = jax.random.normal(jax.random.fold_in(k, 2), (L, spec.rank, fan_out), jnp.float32)
    return jax.block_until_ready(arrays)


def bench_sampler(scale, args):
    import jax
    import jax.numpy as jnp

    from uecjax.models.lora import adapter_names, merge_layer_arrays
    from uecjax.models.lora_init import add_lora
    from uecjax.sampler import Sampler, SamplingParams

    sargs = argparse.Namespace(dtype="float32", param_dtype="float32", remat="full",
                               layers=args.layers)
    config, real = scale.shape_config(args.sampler_shape, sargs)
    spec = lora_spec(args)
    lora_model = add_lora(scale.build_model(config), spec)
    layers = lora_model.layers
    key = jax.random.key(7)
    for i, t in enumerate(spec.targets):  # B != 0: the adapters change the model
        b = getattr(layers, adapter_names(t)[1])
        b[...] = 0.02 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype)
    merged_model = scale.build_model(config)  # the same base weights (same seed)
    host = {k: np.asarray(v) for k, v in layers.arrays().items()}
    for name, value in merge_layer_arrays(host, spec).items():
        getattr(merged_model.layers, name)[...] = jnp.asarray(value)

    rows, prompt, new = args.sampler_batch, args.sampler_prompt, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, config.vocab_size, (rows, prompt)).tolist()
    samplers = {"unmerged": Sampler(lora_model), "merged": Sampler(merged_model)}
    for temperature in (0.0, 1.0):
        sp = SamplingParams(max_new_tokens=new, temperature=temperature, seed=1)
        results, outs = {}, {}
        for mode, sampler in samplers.items():
            out, first = scale.timed(lambda: sampler(prompts, sp))
            assert out.response_mask.sum() == rows * new, "every row should run to max_new_tokens"
            results[mode] = (first, [])
            outs[mode] = out
        for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
            for mode, sampler in samplers.items():
                results[mode][1].append(scale.timed(lambda: sampler(prompts, sp))[1])
        best = {m: min(t) for m, (_, t) in results.items()}
        tps = {m: rows * new / best[m] for m in best}
        line = dict(figure="sampler", kind="greedy" if temperature == 0 else "sampling",
                    temperature=temperature, shape=args.sampler_shape,
                    layers=config.num_hidden_layers, real_layers=real.num_hidden_layers,
                    dtype=config.dtype, rows=rows, prompt=prompt, new_tokens=new,
                    lora=dict(rank=spec.rank, alpha=spec.alpha, targets=list(spec.targets)),
                    repeats=args.repeats)
        for m in samplers:
            line[f"{m}_first_call_s"] = scale.rounded(results[m][0])
            line[f"{m}_s"] = scale.rounded(best[m])
            line[f"{m}_tokens_per_s"] = scale.rounded(tps[m])
        line["unmerged_over_merged"] = scale.rounded(tps["unmerged"] / tps["merged"])
        same = outs["unmerged"].response_tokens == outs["merged"].response_tokens
        line["tokens_agree_frac"] = scale.rounded(float(same.mean()))
        emit(**line)

    merge = merge_fn(spec)
    first, best = time_merge(scale, merge, layers.arrays(), args.repeats)
    merged_bytes = sum(host[f"{t}_w"].nbytes for t in spec.targets)
    line = dict(figure="sampler", kind="merge", shape=args.sampler_shape, layers=config.num_hidden_layers,
                real_layers=real.num_hidden_layers, dtype=config.dtype,
                lora=dict(rank=spec.rank, alpha=spec.alpha), first_call_s=scale.rounded(first),
                merge_s=scale.rounded(best), merged_weight_bytes=merged_bytes)
    del lora_model, merged_model, samplers, layers, host
    gc.collect()
    if real.num_hidden_layers != config.num_hidden_layers:
        arrays = real_depth_arrays(real, spec)
        first_r, best_r = time_merge(scale, merge, arrays, args.repeats)
        line.update(real_depth_first_call_s=scale.rounded(first_r),
                    real_depth_merge_s=scale.rounded(best_r),
                    real_depth_merged_weight_bytes=sum(arrays[f"{t}_w"].nbytes for t in spec.targets))
        del arrays
        gc.collect()
    emit(**line)


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--out", default=None, help="also write the JSON lines to this file")
    add("--quick", action="store_true", help=f"smoke run: {QUICK}; toy-preset dry runs")
    add("--rank", type=int, default=64)
    add("--alpha", type=float, default=128.0)
    add("--skip_dry_run", action="store_true")
    add("--dry_run_devices", default="1,8", help="comma list of device counts")
    add("--dry_run_timeout", type=int, default=3600, help="seconds for all dry runs")
    add("--skip_train", action="store_true")
    add("--train_shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    add("--layers", type=int, default=2, help="decoder layers of the timed shapes (0: real depth)")
    add("--method", default="uec", choices=("uec", "grpo"))
    add("--train_rows", type=int, default=2)
    add("--train_prompt", type=int, default=32)
    add("--train_response", type=int, default=32)
    add("--train_repeats", type=int, default=3)
    add("--skip_sampler", action="store_true")
    add("--sampler_shape", default="qwen2.5-0.5b")
    add("--sampler_batch", type=int, default=4)
    add("--sampler_prompt", type=int, default=32)
    add("--new_tokens", type=int, default=32)
    add("--repeats", type=int, default=3)
    add("--_dry_run_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    args.dry_run_device_counts = [int(d) for d in args.dry_run_devices.split(",")]
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._dry_run_child:
        dry_runs_child(args)
        return
    if args.out:
        OUT.append(open(args.out, "w"))
    child = None
    if not args.skip_dry_run and args.quick:
        # A smoke run: the dry runs compile alongside the timings (two cores), which are then
        # no figures; a real run times first, alone, and dry-runs after.
        child = start_dry_runs(argv)
    if not (args.skip_train and args.skip_sampler):
        import flax
        import jax

        scale = load_scale()
        device = jax.devices()[0]
        emit(figure="setup", platform=device.platform, device_kind=device.device_kind,
             devices=jax.device_count(), jax=jax.__version__, flax=flax.__version__,
             args={k: v for k, v in vars(args).items() if not k.startswith("_")})
        if not args.skip_train:
            for name in args.train_shapes.split(","):
                bench_train(scale, name, args)
        if not args.skip_sampler:
            bench_sampler(scale, args)
    if not args.skip_dry_run:
        finish_dry_runs(child or start_dry_runs(argv), args)


if __name__ == "__main__":
    main()
