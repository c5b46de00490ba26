"""Sampler throughput: uecjax against transformers `generate` on the same random weights.

    python experiments/benchmarks/sampler.py [--new_tokens 32,128,256] [--batch 16]
        [--skip_fixed] [--skip_long_tail] [--tail_slots 64,128,256]

Config (issue 2): vocab 8192, hidden 256, intermediate 704, 4 layers, 8 heads, 2 KV heads,
tied embeddings; batch 16, prompt 64, new tokens forced (no stop token), sampling at T=1 over
the full vocabulary, and greedy. transformers runs on PyTorch CPU with 2 threads and
use_cache=True. Prints one JSON line per figure; ratios compare runs of the same process.
Compile time is reported apart (first call), throughput is the best of --repeats timed calls.

Long-tailed workload (issue 16): --tail_prompts 64 prompts x G = --tail_n 8 samples, response
limit 512, each row's length drawn from a log-normal (sigma --tail_sigma 0.65, scaled so the
longest is 512; max / mean about 6) and forced with `Sampler(...)(response_limits=)`, the
documented per-row limit hook. Continuous batching (each --tail_slots count) against static
batching of the same rows, same seed, same tokens: tokens/s, slot utilisation (useful
slot-steps / all slot-steps) and recompiles after warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

CONFIG = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
              max_position_embeddings=2048)


def emit(**fields):
    print(json.dumps(fields), flush=True)


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new_tokens", default="32,128,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_transformers", action="store_true")
    parser.add_argument("--skip_fixed", action="store_true", help="only the long-tailed workload")
    parser.add_argument("--skip_long_tail", action="store_true")
    parser.add_argument("--tail_prompts", type=int, default=64)
    parser.add_argument("--tail_n", type=int, default=8)
    parser.add_argument("--tail_limit", type=int, default=512)
    parser.add_argument("--tail_sigma", type=float, default=0.65)
    parser.add_argument("--tail_seed", type=int, default=0, help="the lengths' draw")
    parser.add_argument("--tail_slots", default="64,128,256")
    parser.add_argument("--fixed_batching", default="static,continuous")
    parser.add_argument("--tail_repeats", type=int, default=1,
                        help="timed calls per long-tail figure after the warm-up call")
    args = parser.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_model = Qwen2ForCausalLM(Qwen2Config(**CONFIG)).eval()
    ckpt = tempfile.mkdtemp(prefix="uecjax-bench-")
    hf_model.save_pretrained(ckpt)

    import jax
    from uecjax.models import from_pretrained
    from uecjax.sampler import Sampler, SamplingParams

    model = from_pretrained(ckpt)
    sampler = Sampler(model, batching="static")  # the fixed-length figures: the static path
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, CONFIG["vocab_size"], (args.batch, args.prompt)).tolist()
    emit(bench="sampler", device=str(jax.devices()[0].platform), jax=jax.__version__,
         torch=torch.__version__, batch=args.batch, prompt=args.prompt, **CONFIG)

    if not args.skip_long_tail:
        long_tail(args, model, rng)
    if args.skip_fixed:
        return
    # Recompiles across 20 calls with different prompt lengths inside one bucket (33..64).
    params = SamplingParams(max_new_tokens=16)
    sampler([prompts[0][:40]] * args.batch, params)
    compiles = sampler.compile_count
    for length in rng.choice(np.arange(33, 65), 20, replace=False):
        sampler([p[:int(length)] for p in prompts], params)
    emit(figure="recompiles_20_prompt_lengths_one_bucket", value=sampler.compile_count - compiles)

    news = [int(n) for n in args.new_tokens.split(",")]
    samplers = {"static": sampler, "continuous": Sampler(model, batching="continuous")}
    times, reference = {}, {}
    for mode, temperature in (("sample_t1", 1.0), ("greedy", 0.0)):
        for new in news:
            params = SamplingParams(max_new_tokens=new, temperature=temperature, seed=1)
            if not args.skip_transformers:
                ids = torch.tensor(prompts)
                kwargs = dict(max_new_tokens=new, min_new_tokens=new, use_cache=True,
                              pad_token_id=0)
                if temperature:
                    kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
                else:
                    kwargs.update(do_sample=False)
                with torch.no_grad():
                    hf_model.generate(ids, **kwargs)  # warm-up
                    reference[mode, new] = best_time(lambda: hf_model.generate(ids, **kwargs),
                                                     args.repeats)
            for batching in args.fixed_batching.split(","):
                s = samplers[batching]
                start = time.perf_counter()
                compiles = s.compile_count
                s(prompts, params)
                first = time.perf_counter() - start
                run = best_time(lambda: s(prompts, params), args.repeats)
                times[batching, mode, new] = run
                ours = args.batch * new / run
                row = dict(mode=mode, batching=batching, new_tokens=new,
                           uecjax_tokens_per_s=round(ours, 1), uecjax_s=round(run, 4),
                           uecjax_first_call_s=round(first, 3),
                           uecjax_compile_s=round(max(first - run, 0.0), 3),
                           new_compiles=s.compile_count - compiles)
                if (mode, new) in reference:
                    theirs = args.batch * new / reference[mode, new]
                    row.update(transformers_tokens_per_s=round(theirs, 1),
                               transformers_s=round(reference[mode, new], 4),
                               speedup=round(ours / theirs, 2))
                emit(**row)
        for batching in args.fixed_batching.split(","):
            # The cache keeps decode cost per token flat: time(longest) / time(shortest).
            emit(figure=f"time_ratio_{news[-1]}_vs_{news[0]}_new_tokens", mode=mode,
                 batching=batching,
                 value=round(times[batching, mode, news[-1]] / times[batching, mode, news[0]], 2))
    for new in news:  # greedy against sampling, same path
        for batching in args.fixed_batching.split(","):
            emit(figure="greedy_over_sampling_tokens_per_s", batching=batching, new_tokens=new,
                 value=round(times[batching, "sample_t1", new] / times[batching, "greedy", new], 3))


def long_tail(args, model, rng):
    """Continuous against static batching on long-tailed lengths (module docstring)."""
    from uecjax.sampler import Sampler, SamplingParams

    rows = args.tail_prompts * args.tail_n
    draw = np.random.default_rng(args.tail_seed).lognormal(0.0, args.tail_sigma, rows)
    limits = np.clip(np.round(draw / draw.max() * args.tail_limit), 1, args.tail_limit).astype(np.int32)
    prompts = [rng.integers(1, CONFIG["vocab_size"], args.prompt).tolist()
               for _ in range(args.tail_prompts)]
    params = SamplingParams(max_new_tokens=args.tail_limit, temperature=1.0, n=args.tail_n, seed=3)
    emit(figure="long_tail_workload", prompts=args.tail_prompts, n=args.tail_n, rows=rows,
         limit=args.tail_limit, mean_length=round(float(limits.mean()), 1),
         max_over_mean=round(float(limits.max() / limits.mean()), 2))
    tokens = int(limits.sum())
    results = {}
    for name, sampler in [("static", Sampler(model, batching="static"))] + [
            (f"continuous_{s}", Sampler(model, batching="continuous", slots=int(s)))
            for s in args.tail_slots.split(",")]:
        call = lambda: sampler(prompts, params, response_limits=limits)  # noqa: E731
        start = time.perf_counter()
        out = call()
        first = time.perf_counter() - start
        compiles = sampler.compile_count
        run = best_time(call, args.tail_repeats)
        assert int(out.response_lengths.sum()) == tokens, "a row ended before its drawn length"
        results[name] = (run, out)
        row = dict(figure="long_tail", batching=name, tokens_per_s=round(tokens / run, 1),
                   seconds=round(run, 3), first_call_s=round(first, 3),
                   slot_utilization=round(out.slot_utilization, 4),
                   recompiles_after_warmup=sampler.compile_count - compiles)
        if name != "static":
            ref_time, ref = results["static"]
            row.update(speedup_vs_static=round(ref_time / run, 2),
                       same_tokens_as_static=bool(np.array_equal(out.response_tokens, ref.response_tokens)))
        emit(**row)


if __name__ == "__main__":
    main()
