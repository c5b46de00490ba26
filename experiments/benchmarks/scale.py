"""Real-shape benchmark (issue 6): sampler and train step at Qwen2.5 shapes, random weights.

    # one GPU (H100) or one TPU chip: full depth, bfloat16 (the dry runs are separate, below)
    python experiments/benchmarks/scale.py --skip_dry_run
    # CPU-sized: the real widths (hidden, MLP, heads, vocabulary), 2 layers, small batches
    python experiments/benchmarks/scale.py --layers 2 --sampler_batch 4 --sampler_prompt 32 \
        --new_tokens 32 --train_rows 2 --train_prompt 32 --train_response 32 --skip_dry_run
    # per-device memory of the math config for VL-3B and 7B on 1, 8, 64 devices (CPU compile)
    python experiments/benchmarks/scale.py --dry_run
    # smoke run (tests/test_bench_scale.py)
    python experiments/benchmarks/scale.py --quick --skip_dry_run --shapes qwen2.5-0.5b

One JSON line per figure, each with "bench": "scale" and "figure". Nothing is downloaded: the
shapes are `uecjax.models.presets` (qwen2.5-0.5b, qwen2.5-1.5b, and qwen2.5-vl-3b, the language
model of Qwen2.5-VL-3B: a Qwen2 decoder, here with plain 1-D positions), built with
`Qwen2(config, rngs=nnx.Rngs(0))`. `--layers N` keeps the real width with N layers (every
shape line says `layers` and `real_layers`); 0 keeps the real depth. `--dtype` is the compute
dtype (default bfloat16 on GPU / TPU, float32 on CPU), `--param_dtype` the storage dtype of the
weights (default: the compute dtype; the trainer's own default is float32 parameters), `--remat`
the train step's remat mode (default full, as configs/*.py). Everything runs on the first
device (mesh 1 x 1 x 1).

Figures
-------
setup             platform, device_kind, versions, numerics, the spec-sheet row if known.
peak_matmul       reference (a): best time of `--matmul_iters` chained [n, n] @ [n, n]
                  matmuls in the benchmark dtype inside one jitted loop (n = --matmul_size,
                  4096 on GPU / TPU, 1024 on CPU): flops_per_s = iters * 2 n^3 / time.
memory_bandwidth  reference (b): best time of `--bandwidth_iters` full reads (a sum) of a
                  float32 buffer of --bandwidth_mib MiB (1024 on GPU / TPU, 256 on CPU) inside
                  one jitted loop, and of as many in-place copies (x <- a x + b: read + write,
                  counted twice); bytes_per_s, the reference, is the faster of the two.
shape             parameters (benchmarked and real depth), widths, weight bytes.
sampler           `uecjax.sampler.Sampler` at --sampler_batch rows, --sampler_prompt prompt
                  tokens and --new_tokens new tokens, temperature 1 over the full vocabulary,
                  no stop token (every row runs to the end). Timed through the public API:
                  t(k) is the best of --repeats calls with max_new_tokens = k. The compiled
                  functions depend on the response *bucket* only (max_new_tokens is a loop
                  bound), so t(new) and t(lo), lo = the previous bucket + 1 (or 1), share one
                  compile and one cache size, and
                      decode_step_s = (t(new) - t(lo)) / (new - lo)
                      prefill_s     = t(lo) - (lo - 1) * decode_step_s
                  (prefill_s: the prompt pass, the first token, the call's host work and the
                  transfer of the outputs). decode_tokens_per_s = rows / decode_step_s;
                  end_to_end_tokens_per_s = rows * new / t(new); compile_s = first call of
                  t(new) - t(new) (prefill and decode, traced and compiled in that call).
                  Decode roofline: bytes_per_step = weight bytes read + KV-cache bytes read;
                  roofline_frac = bytes_per_step / decode_step_s / bytes_per_s, and
                  roofline_frac_spec against the spec bandwidth. Weight bytes: every
                  parameter (the tied embedding is read whole as the lm-head; an untied
                  embedding only by the gathered rows, so it is left out). KV bytes: the
                  decode step attends over the whole allocated cache, masked
                  (uecjax.models.qwen2: scores over all S slots), so each step reads
                      2 (k, v) * layers * rows * kv_heads * S * head_dim * itemsize,
                  S = prompt bucket + response bucket, the same at every step;
                  kv_bytes_if_filled_only says what reading only the filled slots (prompt
                  bucket + the average generated length) would have cost, for comparison.
                  Not counted (overheads of the implementation, not of the model): the
                  [rows, vocab] float32 logits that the sampling writes and reads a few times
                  (each pass 39 MB at batch 64: 4% of the bfloat16 weight bytes of 0.5B, 1.3%
                  of 1.5B, 0.6% of 3B) and the one new KV slot written.
                  Target (issue 6): roofline_frac >= 0.6 at batch 64 on GPU.
train_step        `uecjax.train_step.TrainStep` (method --method, beta 0, AdamW) on
                  --train_rows rows x (--train_prompt + --train_response) tokens, no padding,
                  --micro_batches, --chunk_size; the old log-probs are computed beforehand and
                  are not part of the step. step_s is the best of --train_repeats steps,
                  compile_s = first step - step_s, tokens_per_s = rows * (prompt + response)
                  / step_s. FLOPs (`train_flops`), with N = layers * (H q + 2 H kv + q H +
                  3 H I) the decoder's matmul weights (q = heads * head_dim, kv = kv_heads *
                  head_dim; no embedding, biases or norms), T = prompt + response - 1 the
                  decoder's input length (the last token is never an input), R the response
                  length (only the R hidden states that predict the response reach the
                  lm-head):
                      model_flops = 6 N rows T                      (forward + backward)
                                  + 12 layers T q rows T            (attention, PaLM: QK^T
                                                                     and PV, full T x T)
                                  + 6 H V rows R                    (lm-head)
                  The attention term is not halved for causality: the implementation computes
                  the whole T x T score matrix and masks it. hardware_flops adds what the
                  step recomputes: the chunked lm-head always recomputes its logits in the
                  backward (8 H V rows R); remat "per_layer" recomputes attention (16 instead
                  of 12), remat "full" the whole layer (8 N instead of 6 N, and 16).
                  mfu = model_flops / step_s / peak (measured peak_matmul; mfu_spec against
                  the spec sheet), hfu the same with hardware_flops. Target (issue 6):
                  mfu_spec >= 0.35 for qwen2.5-1.5b in bfloat16 on GPU.
dry_run           per-device memory for --dry_run_models on --dry_run_devices simulated CPU
                  devices, mesh data=1, fsdp=-1. Text shapes are sized with configs/math.py
                  (uec, 256 rows x (1024 + 2048) tokens, bfloat16 compute, float32
                  parameters, remat full), Qwen2.5-VL shapes with configs/geo3k.py (80 rows x
                  (2048 + 2048) tokens, the vision tower trained, one 512^2 image per row:
                  config.vision.dry_run_pixels). Each case runs `python -m uecjax.train
                  --config=CONFIG --dry_run --config.model.preset=NAME --config.mesh.data=1
                  --config.mesh.fsdp=-1 --dry_run_devices=N` and its final JSON line is
                  re-emitted (uecjax/dry_run.py). Where N does not divide the config's rows
                  (geo3k's 80 on 64 devices), prompts_per_batch grows by whole batches until
                  it does; where micro_batches times N does not, micro_batches is halved
                  until it does; the line says which were used. Temporaries are the CPU
                  compiler's (an estimate for GPU / TPU, see uecjax/dry_run.py). The
                  64-device compiles take minutes on a small CPU.

Spec sheets (bfloat16 dense matmul peak, memory bandwidth), used only for the *_spec ratios;
peaks only when --dtype is bfloat16:
    NVIDIA H100 SXM   989 TFLOP/s  3.35 TB/s   NVIDIA H100 Tensor Core GPU datasheet (1,979
                                               TFLOP/s "with sparsity", halved)
    NVIDIA H200 SXM   989 TFLOP/s  4.8 TB/s    NVIDIA H200 Tensor Core GPU datasheet (same)
    NVIDIA A100 80GB  312 TFLOP/s  2.039 TB/s (SXM) / 1.935 TB/s (PCIe); A100 40GB 1.555 TB/s
                                               NVIDIA A100 Tensor Core GPU datasheet
    TPU v4            275 TFLOP/s  1.2 TB/s    cloud.google.com/tpu/docs/v4
    TPU v5e           197 TFLOP/s  0.819 TB/s  cloud.google.com/tpu/docs/v5e
    TPU v5p           459 TFLOP/s  2.765 TB/s  cloud.google.com/tpu/docs/v5p
    TPU v6e           918 TFLOP/s  1.64 TB/s   cloud.google.com/tpu/docs/v6e
Matched on `jax.devices()[0].device_kind`; H100 / H200 PCIe and NVL parts are not matched
(lower clocks and bandwidth): their *_spec fields are null, as for any other device.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-vl-3b")

# --quick: a smoke run (1 layer, tiny batches, few tokens, small references). Flags given on
# the command line still win.
QUICK = dict(layers=1, sampler_batch=2, sampler_prompt=16, new_tokens=8, train_rows=2,
             train_prompt=16, train_response=16, repeats=2, train_repeats=1, matmul_size=256,
             matmul_iters=2, bandwidth_mib=16, bandwidth_iters=2)


def emit(**fields):
    print(json.dumps({"bench": "scale", **fields}), flush=True)


# ---- spec sheets ---------------------------------------------------------------------------

def spec_sheet(device_kind: str):
    """(name, bfloat16 dense FLOP/s, bytes/s) of a known accelerator, else None (docstring)."""
    kind = device_kind.strip()
    if kind.startswith("NVIDIA"):
        if "PCIe" in kind or "NVL" in kind:
            if "A100" in kind and "80GB" in kind:
                return ("NVIDIA A100 80GB PCIe", 312e12, 1.935e12)
            if "A100" in kind:
                return ("NVIDIA A100 40GB PCIe", 312e12, 1.555e12)
            return None
        if "H200" in kind:
            return ("NVIDIA H200 SXM", 989e12, 4.8e12)
        if "H100" in kind:
            return ("NVIDIA H100 SXM", 989e12, 3.35e12)
        if "A100" in kind:
            return (("NVIDIA A100 80GB SXM", 312e12, 2.039e12) if "80GB" in kind
                    else ("NVIDIA A100 40GB SXM", 312e12, 1.555e12))
        return None
    return {"TPU v4": ("TPU v4", 275e12, 1.2e12),
            "TPU v5 lite": ("TPU v5e", 197e12, 0.819e12),
            "TPU v5e": ("TPU v5e", 197e12, 0.819e12),
            "TPU v5": ("TPU v5p", 459e12, 2.765e12),
            "TPU v5p": ("TPU v5p", 459e12, 2.765e12),
            "TPU v6 lite": ("TPU v6e", 918e12, 1.64e12),
            "TPU v6e": ("TPU v6e", 918e12, 1.64e12)}.get(kind)


# ---- FLOPs and bytes -------------------------------------------------------------------------

def decoder_matmul_params(config) -> int:
    """The decoder layers' matmul weights: layers * (H q + 2 H kv + q H + 3 H I)."""
    H, I = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return config.num_hidden_layers * (H * q + 2 * H * kv + q * H + 3 * H * I)


def train_flops(config, rows: int, prompt_len: int, response_len: int, remat: str = "none") -> dict:
    """FLOPs of one train step on rows x (prompt_len + response_len) tokens (docstring).

    model: 6 N rows T + 12 layers T q rows T + 6 H V rows R, with T = prompt + response - 1
    (the decoder's inputs), R = response (the lm-head's inputs). hardware: what the step
    computes with `remat`: the lm-head 8 H V rows R always, attention 16 instead of 12 with
    remat per_layer or full, the layers' matmuls 8 N instead of 6 N with remat full.
    """
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    N = decoder_matmul_params(config)
    T, R = prompt_len + response_len - 1, response_len
    dense, attention, head = N * rows * T, L * T * q * rows * T, H * V * rows * R
    model = 6 * dense + 12 * attention + 6 * head
    dense_k = 8 if remat == "full" else 6
    attention_k = 12 if remat == "none" else 16
    hardware = dense_k * dense + attention_k * attention + 8 * head
    return dict(model=model, hardware=hardware, dense=6 * dense, attention=12 * attention,
                lm_head=6 * head)


def decode_kv_bytes(config, rows: int, slots: int, itemsize: int) -> int:
    """KV-cache bytes one decode step reads: keys and values of every layer, `slots` slots."""
    return (2 * config.num_hidden_layers * rows * config.num_key_value_heads * slots
            * config.head_dim * itemsize)


# ---- timing helpers --------------------------------------------------------------------------

def timed(fn):
    import jax

    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def ratio(x, y):
    return None if x is None or y is None or not y else x / y


def rounded(x, digits=4):
    return None if x is None else float(f"{x:.{digits}g}")


# ---- references --------------------------------------------------------------------------------

def peak_matmul(args, dtype, spec):
    import jax
    import jax.numpy as jnp

    n, iters = args.matmul_size, args.matmul_iters
    kx, kw = jax.random.split(jax.random.key(0))
    w = (jax.random.normal(kw, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

    @jax.jit
    def make_x():
        return jax.random.normal(kx, (n, n), jnp.float32).astype(dtype)

    @jax.jit
    def chain(x, w):
        return jax.lax.fori_loop(0, iters, lambda i, x: (x @ w).astype(dtype), x)

    x = make_x()
    x = jax.block_until_ready(chain(x, w))  # compile
    best = math.inf
    for _ in range(args.repeats):
        x, t = timed(lambda: chain(x, w))
        best = min(best, t)
    flops = iters * 2 * n**3 / best
    spec_flops = spec[1] if spec and jnp.dtype(dtype) == jnp.bfloat16 else None
    emit(figure="peak_matmul", dtype=str(jnp.dtype(dtype)), size=n, iters=iters,
         best_s=rounded(best), flops_per_s=rounded(flops), spec_flops_per_s=spec_flops,
         frac_of_spec=rounded(ratio(flops, spec_flops)))
    return flops


def memory_bandwidth(args, spec):
    import jax
    import jax.numpy as jnp

    n = args.bandwidth_mib * 2**20 // 4
    iters = args.bandwidth_iters

    # The buffer is the loop's carry, one element rewritten per iteration, so no read can be
    # hoisted out of the loop; donated, so that entering the loop copies nothing.
    @jax.jit
    def make():
        return jnp.ones((n,), jnp.float32)

    def read_body(i, carry):
        x, acc = carry
        x = x.at[0].set(acc * 1e-9)
        return x, jnp.sum(x)

    read = jax.jit(lambda x: jax.lax.fori_loop(0, iters, read_body, (x, jnp.float32(0))),
                   donate_argnums=0)
    copy = jax.jit(lambda x: jax.lax.fori_loop(0, iters, lambda i, x: x * 0.5 + 0.5, x),
                   donate_argnums=0)

    x = make()
    x, _ = jax.block_until_ready(read(x))  # compile
    best_read = math.inf
    for _ in range(args.repeats):
        (x, _), t = timed(lambda: read(x))
        best_read = min(best_read, t)
    x = jax.block_until_ready(copy(x))
    best_copy = math.inf
    for _ in range(args.repeats):
        x, t = timed(lambda: copy(x))
        best_copy = min(best_copy, t)
    read_bw = iters * 4 * n / best_read
    copy_bw = iters * 2 * 4 * n / best_copy
    bw = max(read_bw, copy_bw)
    spec_bw = spec[2] if spec else None
    emit(figure="memory_bandwidth", buffer_bytes=4 * n, iters=iters, read_best_s=rounded(best_read),
         read_bytes_per_s=rounded(read_bw), copy_best_s=rounded(best_copy),
         copy_bytes_per_s=rounded(copy_bw), bytes_per_s=rounded(bw), spec_bytes_per_s=spec_bw,
         frac_of_spec=rounded(ratio(bw, spec_bw)))
    return bw


# ---- the model ---------------------------------------------------------------------------------

def shape_config(name, args):
    from uecjax.models.presets import preset

    real = preset(name, language_model_only=True, dtype=args.dtype, param_dtype=args.param_dtype,
                  remat=args.remat)
    layers = args.layers or real.num_hidden_layers
    return real.replace(num_hidden_layers=layers), real


def build_model(config):
    import jax
    from flax import nnx

    from uecjax.models import Qwen2

    model = Qwen2(config, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    return model


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of all parameters, bytes one decode step reads: all but an untied embedding)."""
    import jax
    from flax import nnx

    total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    read = total - (0 if model.lm_head is None else model.embed[...].nbytes)
    return total, read


# ---- sampler -----------------------------------------------------------------------------------

def bench_sampler(model, config, tag, args, refs):
    import jax.numpy as jnp

    from uecjax.sampler import Sampler, SamplingParams, bucket

    sampler = Sampler(model)
    rows_in, prompt, new = args.sampler_batch, args.sampler_prompt, args.new_tokens
    P = bucket(prompt, sampler.prompt_buckets)
    R = bucket(new, sampler.response_buckets)
    rows = bucket(rows_in, [2**i for i in range(20)])
    below = [b for b in sampler.response_buckets if b < R]
    lo = below[-1] + 1 if below else 1
    if new <= lo:
        raise SystemExit(f"--new_tokens={new}: must exceed {lo} (the previous response bucket + 1)"
                         " so that two lengths share one compile; use a bucket size, e.g. 256")
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, config.vocab_size, (rows_in, prompt)).tolist()

    def call(k):
        return lambda: sampler(prompts, SamplingParams(max_new_tokens=k, temperature=1.0, seed=1))

    compiles = sampler.compile_count
    out, first = timed(call(new))
    assert out.response_mask.sum() == rows_in * new, "every row should run to max_new_tokens"
    compiled = sampler.compile_count - compiles
    timed(call(lo))
    t_new, t_lo = math.inf, math.inf
    for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
        t_new = min(t_new, timed(call(new))[1])
        t_lo = min(t_lo, timed(call(lo))[1])
    step = (t_new - t_lo) / (new - lo)
    prefill = t_lo - (lo - 1) * step

    _, read_w = weight_bytes(model)
    cache_itemsize = jnp.dtype(sampler.cache_dtype or config.compute_dtype).itemsize
    kv = decode_kv_bytes(config, rows, P + R, cache_itemsize)
    # Decode steps 1 .. new - 1 see P + t filled slots: on average P + new / 2.
    kv_filled = decode_kv_bytes(config, rows, P + new / 2, cache_itemsize)
    per_step = read_w + kv
    achieved = per_step / step if step > 0 else None
    emit(figure="sampler", **tag, rows=rows_in, batch_bucket=rows, prompt=prompt, prompt_bucket=P,
         new_tokens=new, response_bucket=R, cache_slots=P + R, short_new_tokens=lo,
         temperature=1.0, first_call_s=rounded(first), compile_s=rounded(first - t_new),
         compiles=compiled, new_compiles_after_first=sampler.compile_count - compiles - compiled,
         end_to_end_s=rounded(t_new), end_to_end_tokens_per_s=rounded(rows_in * new / t_new),
         short_call_s=rounded(t_lo), decode_step_s=rounded(step),
         decode_tokens_per_s=rounded(ratio(rows_in, step) if step > 0 else None),
         prefill_s=rounded(prefill), prefill_tokens_per_s=rounded(ratio(rows_in * prompt, prefill)),
         weight_bytes_per_step=read_w, kv_bytes_per_step=kv,
         kv_bytes_if_filled_only=int(kv_filled), bytes_per_step=per_step,
         achieved_bytes_per_s=rounded(achieved),
         roofline_frac=rounded(ratio(achieved, refs["bandwidth"])),
         roofline_frac_spec=rounded(ratio(achieved, refs["spec_bandwidth"])))


# ---- train step --------------------------------------------------------------------------------

def random_train_batch(config, rows: int, prompt: int, response: int):
    """A host train batch of random tokens, unpadded, with random advantages, success rates
    and hardness (the train step's cost does not depend on their values)."""
    from uecjax.batch import Batch, positions_from_mask

    rng = np.random.default_rng(0)
    mask = np.ones((rows, prompt + response), np.int32)
    return Batch(tokens=rng.integers(1, config.vocab_size, mask.shape).astype(np.int32),
                 attention_mask=mask, positions=positions_from_mask(mask),
                 response_mask=np.ones((rows, response), np.float32),
                 advantages=rng.normal(size=rows).astype(np.float32),
                 success_rate=rng.choice([0.0, 0.25, 1.0], rows).astype(np.float32),
                 is_hard=(rng.random(rows) < 0.5).astype(np.float32))


def bench_train(model, config, tag, args, refs):
    import jax
    from flax import nnx

    from uecjax.objectives.methods import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.parallel.mesh import make_mesh
    from uecjax.train_step import TrainStep

    B, P, R = args.train_rows, args.train_prompt, args.train_response
    batch = random_train_batch(config, B, P, R)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    ts = TrainStep(model, loss_config(args.method, beta=0.0), OptimConfig(learning_rate=1e-6), mesh,
                   micro_batches=args.micro_batches, chunk_size=args.chunk_size)
    # copy=False: the step takes over the model's buffers (the sampler is done with them).
    params, opt_state, control = ts.init(nnx.state(model), copy=False)
    logp, entropy = ts.compute_logprobs(params, batch)
    batch = ts.place_batch(batch.replace(old_logp=logp, old_entropy=entropy))

    def step():
        nonlocal params, opt_state, control
        params, opt_state, control, metrics = ts.step(params, opt_state, control, batch)
        return metrics

    metrics, first = timed(step)
    loss = float(metrics["loss"])
    times = [timed(step)[1] for _ in range(args.train_repeats)]
    best, median = min(times), float(np.median(times))
    flops = train_flops(config, B, P, R, config.remat)
    peak, spec_peak = refs["flops"], refs["spec_flops"]
    emit(figure="train_step", **tag, method=args.method, remat=config.remat, rows=B, prompt=P,
         response=R, micro_batches=args.micro_batches, chunk_size=args.chunk_size,
         tokens_per_step=B * (P + R), first_call_s=rounded(first), compile_s=rounded(first - best),
         step_s=rounded(best), median_step_s=rounded(median),
         tokens_per_s=rounded(B * (P + R) / best), response_tokens_per_s=rounded(B * R / best),
         model_flops_per_step=flops["model"], hardware_flops_per_step=flops["hardware"],
         flops_dense=flops["dense"], flops_attention=flops["attention"],
         flops_lm_head=flops["lm_head"], model_flops_per_s=rounded(flops["model"] / best),
         mfu=rounded(flops["model"] / best / peak), hfu=rounded(flops["hardware"] / best / peak),
         mfu_spec=rounded(ratio(flops["model"] / best, spec_peak)),
         hfu_spec=rounded(ratio(flops["hardware"] / best, spec_peak)),
         loss_finite=bool(np.isfinite(loss)))


# ---- dry runs ----------------------------------------------------------------------------------

def dry_run_config(name: str) -> str:
    """The config a shape is sized with: Qwen2.5-VL presets the Geometry3K recipe (vision tower
    and images included), text presets configs/math.py."""
    return "configs/geo3k.py" if "-vl-" in name else "configs/math.py"


def config_rows(config: str):
    """(prompts per batch, group size x 1 / updates per rollout, micro_batches) of a config file:
    the second factor gives an update's rows (uecjax.updates) as prompts * it."""
    sys.path.insert(0, REPO)
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dry_run_config", os.path.join(REPO, config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    return (c.rollout.prompts_per_batch, c.rollout.group_size / c.train.updates_per_rollout,
            c.train.micro_batches)


def dry_runs(args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("XLA_FLAGS", None)  # --dry_run_devices sets the device count
    for name in args.dry_run_models.split(","):
        config = dry_run_config(name)
        prompts_config, group, micro = config_rows(config)
        for n in (int(d) for d in args.dry_run_devices.split(",")):
            # An update's rows must split evenly over the devices: grow the batch by whole batches.
            prompts = prompts_config
            while int(prompts * group) % n:
                prompts += prompts_config
            m = micro
            while m > 1 and int(prompts * group) % (m * n):
                m //= 2
            cmd = [sys.executable, "-m", "uecjax.train", f"--config={config}", "--dry_run",
                   f"--config.model.preset={name}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                   f"--config.train.micro_batches={m}", f"--dry_run_devices={n}",
                   f"--config.rollout.prompts_per_batch={prompts}"]
            start = time.perf_counter()
            result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                    timeout=args.dry_run_timeout)
            elapsed = round(time.perf_counter() - start, 1)
            report = None
            for line in reversed(result.stdout.splitlines()):
                try:
                    report = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
            if result.returncode or not isinstance(report, dict):
                emit(figure="dry_run", model=name, devices=n, micro_batches=m, wall_s=elapsed,
                     error=(result.stderr or result.stdout)[-2000:])
                continue
            per = report["per_device_bytes"]
            emit(figure="dry_run", config=config, wall_s=elapsed, micro_batches_config=micro,
                 prompts_per_batch=prompts, prompts_per_batch_config=prompts_config,
                 per_device_gib={k: round(v / 2**30, 3) for k, v in per.items()},
                 **{k: v for k, v in report.items() if k != "dry_run"})


# ---- main --------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help=f"smoke run: {QUICK} (explicit flags still win)")
    add("--shapes", default=",".join(SHAPES), help="comma list of uecjax.models.presets names")
    add("--layers", type=int, default=0, help="num_hidden_layers for every shape (0: the real one)")
    add("--dtype", default="", choices=("", "bfloat16", "float32"),
        help="compute dtype ('': bfloat16 on GPU / TPU, float32 on CPU)")
    add("--param_dtype", default="", choices=("", "bfloat16", "float32"),
        help="weight storage dtype ('': the compute dtype)")
    add("--remat", default="full", choices=("none", "per_layer", "full"))
    add("--repeats", type=int, default=3, help="timed calls of the references and the sampler")
    add("--matmul_size", type=int, default=0, help="0: 4096 on GPU / TPU, 1024 on CPU")
    add("--matmul_iters", type=int, default=0, help="0: 20 on GPU / TPU, 4 on CPU")
    add("--bandwidth_mib", type=int, default=0, help="0: 1024 on GPU / TPU, 256 on CPU")
    add("--bandwidth_iters", type=int, default=0, help="0: 10 on GPU / TPU, 4 on CPU")
    add("--skip_sampler", action="store_true")
    add("--sampler_batch", type=int, default=64)
    add("--sampler_prompt", type=int, default=256)
    add("--new_tokens", type=int, default=512, help="a response bucket size (16, 32, ...)")
    add("--skip_train", action="store_true")
    add("--method", default="uec", choices=("uec", "grpo"))
    add("--train_rows", type=int, default=16)
    add("--train_prompt", type=int, default=512)
    add("--train_response", type=int, default=1024)
    add("--micro_batches", type=int, default=1)
    add("--chunk_size", type=int, default=1024)
    add("--train_repeats", type=int, default=5)
    add("--skip_dry_run", action="store_true")
    add("--dry_run", action="store_true", help="only the dry runs (--skip_sampler --skip_train)")
    add("--dry_run_models", default="qwen2.5-vl-3b,qwen2.5-7b")
    add("--dry_run_devices", default="1,8,64")
    add("--dry_run_timeout", type=int, default=1800, help="seconds per dry-run case")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.dry_run:
        args.skip_sampler = args.skip_train = True
        args.skip_dry_run = False
    return args


def main(argv=None):
    args = parse_args(argv)
    if not (args.skip_sampler and args.skip_train):
        run_models(args)
    if not args.skip_dry_run:
        dry_runs(args)


def run_models(args):
    import flax
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    accel = device.platform != "cpu"
    args.dtype = args.dtype or ("bfloat16" if accel else "float32")
    args.param_dtype = args.param_dtype or args.dtype
    args.matmul_size = args.matmul_size or (4096 if accel else 1024)
    args.matmul_iters = args.matmul_iters or (20 if accel else 4)
    args.bandwidth_mib = args.bandwidth_mib or (1024 if accel else 256)
    args.bandwidth_iters = args.bandwidth_iters or (10 if accel else 4)
    spec = spec_sheet(device.device_kind)
    emit(figure="setup", platform=device.platform, device_kind=device.device_kind,
         devices=jax.device_count(), jax=jax.__version__, flax=flax.__version__,
         spec=None if spec is None else dict(name=spec[0], bf16_flops_per_s=spec[1],
                                             bytes_per_s=spec[2]),
         args=vars(args))

    refs = dict(flops=peak_matmul(args, jnp.dtype(args.dtype), spec),
                bandwidth=memory_bandwidth(args, spec),
                spec_flops=spec[1] if spec and args.dtype == "bfloat16" else None,
                spec_bandwidth=spec[2] if spec else None)

    from uecjax.models.presets import parameter_count

    for name in args.shapes.split(","):
        config, real = shape_config(name, args)
        tag = dict(shape=name, layers=config.num_hidden_layers, real_layers=real.num_hidden_layers,
                   dtype=config.dtype, param_dtype=config.param_dtype)
        (model, build_s) = timed(lambda: build_model(config))
        total_w, read_w = weight_bytes(model)
        emit(figure="shape", **tag, parameters=parameter_count(config),
             real_parameters=parameter_count(real), hidden=config.hidden_size,
             intermediate=config.intermediate_size, heads=config.num_attention_heads,
             kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
             vocab=config.vocab_size, tied=config.tie_word_embeddings,
             decoder_matmul_params=decoder_matmul_params(config), weight_bytes=total_w,
             build_s=rounded(build_s))
        if not args.skip_sampler:
            bench_sampler(model, config, tag, args, refs)
        if not args.skip_train:
            bench_train(model, config, tag, args, refs)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
