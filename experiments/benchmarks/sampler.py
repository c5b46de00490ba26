"""Sampler throughput: uecjax against transformers `generate` on the same random weights.

    python experiments/benchmarks/sampler.py [--new_tokens 32,128,256] [--batch 16]

Config (issue 2): vocab 8192, hidden 256, intermediate 704, 4 layers, 8 heads, 2 KV heads,
tied embeddings; batch 16, prompt 64, new tokens forced (no stop token), sampling at T=1 over
the full vocabulary, and greedy. transformers runs on PyTorch CPU with 2 threads and
use_cache=True. Prints one JSON line per figure; ratios compare runs of the same process.
Compile time is reported apart (first call), throughput is the best of --repeats timed calls.
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
    sampler = Sampler(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, CONFIG["vocab_size"], (args.batch, args.prompt)).tolist()
    emit(bench="sampler", device=str(jax.devices()[0].platform), jax=jax.__version__,
         torch=torch.__version__, batch=args.batch, prompt=args.prompt, **CONFIG)

    # Recompiles across 20 calls with different prompt lengths inside one bucket (33..64).
    params = SamplingParams(max_new_tokens=16)
    sampler([prompts[0][:40]] * args.batch, params)
    compiles = sampler.compile_count
    for length in rng.choice(np.arange(33, 65), 20, replace=False):
        sampler([p[:int(length)] for p in prompts], params)
    emit(figure="recompiles_20_prompt_lengths_one_bucket", value=sampler.compile_count - compiles)

    news = [int(n) for n in args.new_tokens.split(",")]
    times = {}
    for mode, temperature in (("sample_t1", 1.0), ("greedy", 0.0)):
        for new in news:
            params = SamplingParams(max_new_tokens=new, temperature=temperature, seed=1)
            start = time.perf_counter()
            compiles = sampler.compile_count
            sampler(prompts, params)
            first = time.perf_counter() - start
            run = best_time(lambda: sampler(prompts, params), args.repeats)
            times[mode, new] = run
            ours = args.batch * new / run
            row = dict(mode=mode, new_tokens=new, uecjax_tokens_per_s=round(ours, 1),
                       uecjax_s=round(run, 4), uecjax_first_call_s=round(first, 3),
                       uecjax_compile_s=round(max(first - run, 0.0), 3),
                       new_compiles=sampler.compile_count - compiles)
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
                    ref = best_time(lambda: hf_model.generate(ids, **kwargs), args.repeats)
                theirs = args.batch * new / ref
                row.update(transformers_tokens_per_s=round(theirs, 1), transformers_s=round(ref, 4),
                           speedup=round(ours / theirs, 2))
            emit(**row)
        # The cache keeps decode cost per token flat: time(longest) / time(shortest).
        emit(figure=f"time_ratio_{news[-1]}_vs_{news[0]}_new_tokens", mode=mode,
             value=round(times[mode, news[-1]] / times[mode, news[0]], 2))


if __name__ == "__main__":
    main()
