"""Attention benchmark (model.attention): one decoder layer, chunked against xla attention.

    # memory at T = 2048, 8192, 32768 (compile only) and CPU step time at T = 512, 2048
    python experiments/benchmarks/attention.py --out experiments/benchmarks/results/attention_cpu.jsonl
    # smoke run (tests/test_bench_attention.py): QUICK below ("tiny" shape, T 256 / 512,
    # float32, key block 128, 2 repeats)
    python experiments/benchmarks/attention.py --quick

One JSON line per figure, each with "bench": "attention" and "figure" (and, with --out, the
same lines in that file). The layer is the model's own, `uecjax.models.qwen2._decoder_layer`,
with the weights of one layer of `DecoderLayers`, at a `uecjax.models.presets` shape (--preset,
default qwen2.5-1.5b: hidden 1536, 12 heads, 2 KV heads, head_dim 128, MLP 8960), batch
--batch (1), no padding, the decoder's causal mask (`causal_mask`), RoPE at positions
0..T-1, remat "none" (this is one layer's own forward and backward). What is compiled is
`jax.grad` of 0.5 * sum(out^2) (in float32) with respect to the layer's weights and its input
x [B, T, hidden]. Only `config.attention` changes between the two programs; the chunked path's
key block is --block (default `uecjax.models.attention.DEFAULT_BLOCK`: the decoder passes
none, so the benchmark sets that default while it traces). Lines of the memory and time
figures say which implementation `auto` resolves to on this backend for that T x T
self-attention (`uecjax.models.attention.resolve`; on CPU: chunked from CHUNKED_FROM keys).

Figures
-------
setup          platform, versions, the shape, CHUNKED_FROM, the arguments.
memory         per T in --lengths and implementation (xla, chunked): the compiled program's
               `memory_analysis()` (`jax.jit(...).lower(...).compile()`: nothing runs and
               nothing is allocated), in --dtype compute (default bfloat16) with --param_dtype
               weights (default float32, the trainer's): temp_bytes (temporaries: what the
               forward keeps for the backward, scores, workspace; the figure), argument_bytes
               (weights, x, mask, positions), output_bytes (the gradients), alias_bytes, and
               attention_temp_bytes, the temporaries of the attention call alone (forward and
               backward w.r.t. q, k, v of the same shapes). The chunked line has
               temp_ratio_to_xla and attention_temp_ratio_to_xla (chunked / xla, same T).
memory_floor   per T: temp_bytes of the same layer with its attention call replaced by a
               stand-in that keeps nothing of size T x S (`no_attention`): what the layer's
               projections, norms, RoPE and MLP hold whatever the attention. floor_ratio_to_xla
               = floor / the xla layer's temp_bytes is the lowest temp_ratio_to_xla any
               attention implementation could reach; chunked_over_floor_bytes what the chunked
               layer keeps above it.
memory_goal    the issue's goal: at T = 8192 the chunked layer's temporaries <= 10% of the
               reference layer's (goal_met; null when 8192 is not among --lengths), with the
               attention-alone and floor ratios at that length.
time           per T in --time_lengths and implementation: the best of --repeats executions
               of the layer's forward + backward (layer_step_s) and of the attention call's
               alone (attention_step_s), and their medians (median_*), compiled beforehand (layer_compile_s,
               attention_compile_s), the implementations alternating so that machine noise
               hits both alike; --time_dtype compute (default float32: CPUs have no fast
               bfloat16 matmuls), weights 0.02 N(0, 1) (norms 1), x, q, k, v ~ N(0, 1). The
               chunked line has layer_ratio_to_xla and attention_ratio_to_xla (chunked time /
               xla time: above 1, chunked is slower), faster and attention_faster (the faster
               implementation by layer and by attention-alone time) and auto_is_faster
               (whether auto's pick at this T is the faster for the layer). The layer time is
               mostly the MLP and projections, so a layer ratio within a few percent of 1 is
               noise on a shared machine; the attention-alone ratio is the sharper one.

Compiling the 32k reference allocates nothing, so it works on a small CPU machine although
its temporaries are over 100 GiB (the float32 scores alone: 2 KV heads x 6 query heads each
x 32768^2 x 4 bytes = 24 GiB). Measured figures: README.md (model.attention) and
experiments/benchmarks/results/attention_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

GOAL_LENGTH, GOAL_RATIO = 8192, 0.10
IMPLEMENTATIONS = ("xla", "chunked")

# --quick: a smoke run. Flags given on the command line still win.
QUICK = dict(preset="tiny", lengths="256,512", dtype="float32", time_lengths="512", block=128,
             repeats=2)

_out = None


def emit(**fields):
    line = json.dumps({"bench": "attention", **fields})
    print(line, flush=True)
    if _out is not None:
        _out.write(line + "\n")
        _out.flush()


def rounded(x, digits=4):
    return None if x is None else float(f"{x:.{digits}g}")


def lengths(text):
    return [int(t) for t in text.split(",") if t]


def layer_config(args, dtype, implementation):
    from uecjax.models.presets import preset

    return preset(args.preset, dtype=dtype, param_dtype=args.param_dtype, remat="none",
                  attention=implementation).replace(num_hidden_layers=1)


def layer_shapes(cfg, B, T):
    """ShapeDtypeStructs of (weights of one layer, x [B, T, hidden], key_mask, positions)."""
    import jax
    import jax.numpy as jnp

    from flax import nnx

    from uecjax.models.qwen2 import DecoderLayers

    # The weights of one layer of the model's own stack (DecoderLayers, 1 layer), shapes only.
    stacked = jax.eval_shape(lambda: DecoderLayers(cfg, nnx.Rngs(0)).arrays())
    w = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in stacked.items()}
    H = cfg.hidden_size
    return (w, jax.ShapeDtypeStruct((B, T, H), cfg.compute_dtype),
            jax.ShapeDtypeStruct((B, T), jnp.bool_), jax.ShapeDtypeStruct((B, T), jnp.int32))


def layer_grad(cfg):
    """(weights, x, key_mask, positions) -> gradients of 0.5 sum(layer(x)^2) w.r.t. weights, x."""
    import jax
    import jax.numpy as jnp

    from uecjax.models.attention import causal_mask
    from uecjax.models.qwen2 import _decoder_layer
    from uecjax.models.rope import inverse_frequencies, rope_tables

    inv_freq, factor = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_dict(),
                                           cfg.max_position_embeddings)

    def loss(p, x, key_mask, positions):
        cos, sin = rope_tables(positions, jnp.asarray(inv_freq, jnp.float32), factor)
        out, _ = _decoder_layer(cfg, p, x, cos, sin, causal_mask(key_mask), None, None, 0)
        return 0.5 * jnp.sum(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def attention_grad(cfg):
    """(q, k, v, key_mask) -> gradients of 0.5 sum(attention^2) w.r.t. q, k, v."""
    import jax
    import jax.numpy as jnp

    from uecjax.models.attention import attention, causal_mask

    def loss(q, k, v, key_mask):
        out = attention(q, k, v, causal_mask(key_mask), cfg.attention)
        return 0.5 * jnp.sum(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def auto_pick(args, T):
    """What `auto` resolves to for the decoder's T x T causal self-attention at length T."""
    import jax.numpy as jnp

    from uecjax.models.attention import causal_mask, resolve

    cfg = layer_config(args, args.dtype, "auto")
    return resolve("auto", T, T, causal_mask(jnp.ones((1, T), bool)), cfg.compute_dtype)


@contextlib.contextmanager
def key_block(block):
    """`attention()` takes the chunked path's block from DEFAULT_BLOCK at trace time when the
    caller passes none (the decoder passes none): set it for the programs traced inside."""
    import uecjax.models.attention as att

    saved, att.DEFAULT_BLOCK = att.DEFAULT_BLOCK, block
    try:
        yield
    finally:
        att.DEFAULT_BLOCK = saved


@contextlib.contextmanager
def no_attention():
    """The decoder layer with its attention call replaced by a stand-in that keeps no [T, S]
    anything: out = q + the mean over keys of k + v, per KV head (so every projection still
    gets a gradient). What the layer holds besides attention's own temporaries."""
    import jax.numpy as jnp

    import uecjax.models.qwen2 as qwen2

    def stand_in(q, k, v, mask, implementation="xla", **_):
        kv = (k.astype(jnp.float32) + v.astype(jnp.float32)).mean(axis=2)  # [B, kvh, D]
        per_head = jnp.repeat(kv, q.shape[2] // k.shape[1], axis=1)  # head h on KV head h // G
        return q + per_head[:, None].astype(q.dtype)

    saved, qwen2.attention = qwen2.attention, stand_in
    try:
        yield
    finally:
        qwen2.attention = saved


def attention_shapes(cfg, B, T):
    """ShapeDtypeStructs of (q [B, T, heads, D], k, v [B, kv_heads, T, D], key_mask [B, T])."""
    import jax
    import jax.numpy as jnp

    dt, hd = cfg.compute_dtype, cfg.head_dim
    kv = jax.ShapeDtypeStruct((B, cfg.num_key_value_heads, T, hd), dt)
    return (jax.ShapeDtypeStruct((B, T, cfg.num_attention_heads, hd), dt), kv, kv,
            jax.ShapeDtypeStruct((B, T), jnp.bool_))


_programs = {}


def program(kind, impl, dtype, T, args):
    """(compiled forward + backward, its compile seconds), compiled once per (kind, impl,
    dtype, T): kind "layer" (the decoder layer), "attention" (the attention call alone) or
    "floor" (the layer with the stand-in of `no_attention`)."""
    key = (kind, impl, dtype, T)
    if key not in _programs:
        cfg = layer_config(args, dtype, impl)
        fn, shapes = ((attention_grad(cfg), attention_shapes(cfg, args.batch, T)) if kind == "attention"
                      else (layer_grad(cfg), layer_shapes(cfg, args.batch, T)))
        start = time.perf_counter()
        with key_block(args.block), (no_attention() if kind == "floor" else contextlib.nullcontext()):
            compiled = fn.lower(*shapes).compile()
        _programs[key] = compiled, time.perf_counter() - start
    return _programs[key]


def memory(args):
    temps, attn_temps, floors = {}, {}, {}
    for T in lengths(args.lengths):
        for impl in IMPLEMENTATIONS:
            layer, compile_s = program("layer", impl, args.dtype, T, args)
            mem = layer.memory_analysis()
            attn = program("attention", impl, args.dtype, T, args)[0].memory_analysis()
            temps[T, impl] = mem.temp_size_in_bytes
            attn_temps[T, impl] = attn.temp_size_in_bytes
            extra = {}
            if impl == "chunked":
                extra = dict(temp_ratio_to_xla=rounded(temps[T, impl] / temps[T, "xla"]),
                             attention_temp_ratio_to_xla=rounded(
                                 attn_temps[T, impl] / attn_temps[T, "xla"]))
            emit(figure="memory", impl=impl, seq=T, batch=args.batch, dtype=args.dtype,
                 param_dtype=args.param_dtype, block=args.block if impl == "chunked" else None,
                 auto=auto_pick(args, T), temp_bytes=mem.temp_size_in_bytes,
                 temp_gib=round(mem.temp_size_in_bytes / 2**30, 4),
                 argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                 alias_bytes=mem.alias_size_in_bytes, attention_temp_bytes=attn.temp_size_in_bytes,
                 attention_temp_gib=round(attn.temp_size_in_bytes / 2**30, 4),
                 compile_s=round(compile_s, 2), **extra)
        floors[T] = program("floor", "xla", args.dtype, T, args)[0].memory_analysis().temp_size_in_bytes
        emit(figure="memory_floor", seq=T, batch=args.batch, dtype=args.dtype,
             param_dtype=args.param_dtype, temp_bytes=floors[T],
             temp_gib=round(floors[T] / 2**30, 4),
             floor_ratio_to_xla=rounded(floors[T] / temps[T, "xla"]),
             chunked_over_floor_bytes=temps[T, "chunked"] - floors[T])
    goal = dict(figure="memory_goal", seq=GOAL_LENGTH, goal_ratio=GOAL_RATIO,
                temp_ratio_to_xla=None, attention_temp_ratio_to_xla=None, floor_ratio_to_xla=None,
                goal_met=None)
    if GOAL_LENGTH in floors:
        T = GOAL_LENGTH
        ratio = temps[T, "chunked"] / temps[T, "xla"]
        goal.update(temp_ratio_to_xla=rounded(ratio),
                    attention_temp_ratio_to_xla=rounded(attn_temps[T, "chunked"] / attn_temps[T, "xla"]),
                    floor_ratio_to_xla=rounded(floors[T] / temps[T, "xla"]),
                    goal_met=bool(ratio <= GOAL_RATIO))
    emit(**goal)


def random_inputs(cfg, B, T):
    """Weights 0.02 N(0, 1) in param dtype (norms 1), x ~ N(0, 1) in compute dtype, no padding."""
    import jax
    import jax.numpy as jnp

    w, x, key_mask, positions = layer_shapes(cfg, B, T)
    keys = jax.random.split(jax.random.key(0), len(w) + 1)

    def init(name, s, key):
        if name.endswith("norm"):
            return jnp.ones(s.shape, s.dtype)
        return (0.02 * jax.random.normal(key, s.shape, jnp.float32)).astype(s.dtype)

    weights = {n: init(n, s, k) for (n, s), k in zip(sorted(w.items()), keys[1:])}
    xs = jax.random.normal(keys[0], x.shape, jnp.float32).astype(x.dtype)
    return (weights, xs, jnp.ones(key_mask.shape, bool),
            jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), positions.shape))


def attention_inputs(cfg, B, T):
    """q, k, v ~ N(0, 1) in compute dtype, no padding."""
    import jax
    import jax.numpy as jnp

    q, k, v, key_mask = attention_shapes(cfg, B, T)
    keys = jax.random.split(jax.random.key(1), 3)
    return (*(jax.random.normal(key, s.shape, jnp.float32).astype(s.dtype)
              for key, s in zip(keys, (q, k, v))), jnp.ones(key_mask.shape, bool))


def timed(fn, inputs):
    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    return time.perf_counter() - start


def timing(args):
    dt = args.time_dtype
    for T in lengths(args.time_lengths):
        runs = {}
        for impl in IMPLEMENTATIONS:
            cfg = layer_config(args, dt, impl)
            (layer, layer_c), (attn, attn_c) = (program("layer", impl, dt, T, args),
                                                program("attention", impl, dt, T, args))
            run = dict(layer=layer, layer_in=random_inputs(cfg, args.batch, T), attn=attn,
                       attn_in=attention_inputs(cfg, args.batch, T), layer_compile_s=layer_c,
                       attn_compile_s=attn_c, layer_times=[], attn_times=[])
            run["layer_first_s"] = timed(layer, run["layer_in"])  # first run, compiled
            run["attn_first_s"] = timed(attn, run["attn_in"])
            runs[impl] = run
        for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
            for run in runs.values():
                run["layer_times"].append(timed(run["layer"], run["layer_in"]))
                run["attn_times"].append(timed(run["attn"], run["attn_in"]))
        for run in runs.values():
            run["layer_s"], run["attn_s"] = min(run["layer_times"]), min(run["attn_times"])
        ref = runs["xla"]
        faster = min(IMPLEMENTATIONS, key=lambda i: runs[i]["layer_s"])
        attention_faster = min(IMPLEMENTATIONS, key=lambda i: runs[i]["attn_s"])
        auto = auto_pick(args, T)
        for impl, run in runs.items():
            extra = {}
            if impl == "chunked":
                extra = dict(layer_ratio_to_xla=rounded(run["layer_s"] / ref["layer_s"]),
                             attention_ratio_to_xla=rounded(run["attn_s"] / ref["attn_s"]),
                             faster=faster, attention_faster=attention_faster,
                             auto_is_faster=auto == faster)
            emit(figure="time", impl=impl, seq=T, batch=args.batch, dtype=dt,
                 param_dtype=args.param_dtype, block=args.block if impl == "chunked" else None,
                 auto=auto, repeats=args.repeats, layer_step_s=rounded(run["layer_s"]),
                 attention_step_s=rounded(run["attn_s"]),
                 median_layer_step_s=rounded(statistics.median(run["layer_times"])),
                 median_attention_step_s=rounded(statistics.median(run["attn_times"])),
                 layer_first_run_s=rounded(run["layer_first_s"]),
                 layer_compile_s=rounded(run["layer_compile_s"]),
                 attention_compile_s=rounded(run["attn_compile_s"]), **extra)
        _programs.clear()  # free the compiled programs of this length


def parse_args(argv=None):
    from uecjax.models.attention import DEFAULT_BLOCK

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help=f"smoke run: {QUICK} (explicit flags still win)")
    add("--preset", default="qwen2.5-1.5b", help="uecjax.models.presets name (its decoder layer)")
    add("--batch", type=int, default=1)
    add("--block", type=int, default=DEFAULT_BLOCK, help="the chunked path's key block")
    add("--param_dtype", default="float32", choices=("bfloat16", "float32"))
    add("--skip_memory", action="store_true")
    add("--lengths", default="2048,8192,32768", help="sequence lengths of the memory figure")
    add("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
        help="compute dtype of the memory figure")
    add("--skip_time", action="store_true")
    add("--time_lengths", default="512,2048", help="sequence lengths of the time figure")
    add("--time_dtype", default="float32", choices=("bfloat16", "float32"),
        help="compute dtype of the time figure")
    add("--repeats", type=int, default=5, help="timed executions per length and implementation")
    add("--out", default="", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def main(argv=None):
    global _out
    args = parse_args(argv)
    import flax
    import jax

    from uecjax.models.attention import CHUNKED_FROM

    cfg = layer_config(args, args.dtype, "auto")
    if args.out:
        _out = open(args.out, "w")
    emit(figure="setup", platform=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
         jax=jax.__version__, flax=flax.__version__, python=sys.version.split()[0],
         shape=args.preset, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
         heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
         chunked_from=CHUNKED_FROM, args=vars(args))
    try:
        if not args.skip_memory:
            memory(args)
        if not args.skip_time:
            timing(args)
    finally:
        if _out is not None:
            _out.close()


if __name__ == "__main__":
    main()
