"""Train-step benchmarks (issue 3), one JSON line per figure.

    python experiments/benchmarks/train_step.py [--skip_memory] [--skip_throughput]

(a) memory: compiled temp memory of token log-probs + entropies, value and gradient with
    respect to hidden states and the unembedding, at B=8, T=1024, hidden 1536, vocab 151936,
    bfloat16: the chunked, rematerialised version (uecjax.objectives.token_logprobs_and_entropy)
    against the naive full-logits one. Read from `jit(...).lower(...).compile().memory_analysis()`
    (nothing runs). Target: chunked <= 10% of naive.
(b) throughput: train-step tokens/s on CPU for the sampler benchmark's tiny config (vocab 8192,
    hidden 256, intermediate 704, 4 layers, 8 heads, 2 KV heads, tied), batch 16, prompt 64,
    response 128, and the overhead of `uec` (exploration + stabilizer) over `grpo`, timed in the
    same process, alternating the two. Target: overhead <= 10%.
(c) packing: the same tiny config, `uec`, batch --pack_batch rows of mixed prompt lengths
    (uniform in [--prompt / 4, --prompt]) and long-tailed responses (log-normal, sigma
    --pack_sigma, scaled so the longest fills --pack_response: max / mean about 6), the
    padded step against the packed one (`TrainStep(pack=True)`) on the same rows, alternating;
    response tokens/s counts real response tokens. Target on the 2-core CPU: >= 1.8x.

    python experiments/benchmarks/train_step.py --skip_memory --skip_throughput
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

TINY = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
            max_position_embeddings=2048)


def emit(**fields):
    print(json.dumps(fields), flush=True)


def memory(args):
    import jax
    import jax.numpy as jnp

    from uecjax.objectives import naive_token_logprobs_and_entropy, token_logprobs_and_entropy

    B, T, H, V = args.mem_batch, args.mem_len, args.mem_hidden, args.mem_vocab
    dt = jnp.bfloat16
    shapes = (jax.ShapeDtypeStruct((B, T, H), dt), jax.ShapeDtypeStruct((H, V), dt),
              jax.ShapeDtypeStruct((B, T), jnp.int32))

    def value_and_grad(fn):
        def loss(h, w, y):
            logp, ent = fn(h, w, y)
            return jnp.sum(logp) + jnp.sum(ent)
        return jax.value_and_grad(loss, argnums=(0, 1))

    def temp_bytes(fn):
        compiled = jax.jit(value_and_grad(fn)).lower(*shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive = temp_bytes(naive_token_logprobs_and_entropy)
    emit(bench="logprob_memory", impl="naive", batch=B, seq=T, hidden=H, vocab=V, dtype="bfloat16",
         temp_gib=round(naive / 2**30, 3))
    for chunk in (int(c) for c in args.chunks.split(",")):
        chunked = temp_bytes(lambda h, w, y: token_logprobs_and_entropy(h, w, y, chunk_size=chunk))
        emit(bench="logprob_memory", impl="chunked", chunk_size=chunk, batch=B, seq=T, hidden=H,
             vocab=V, dtype="bfloat16", temp_gib=round(chunked / 2**30, 3),
             ratio_to_naive=round(chunked / naive, 4))


def throughput(args):
    import jax
    from flax import nnx

    from uecjax.batch import Batch, positions_from_mask
    from uecjax.models import Qwen2, TextConfig
    from uecjax.objectives.methods import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.parallel.mesh import make_mesh
    from uecjax.train_step import TrainStep

    cfg = TextConfig(**TINY)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    B, P, R = args.batch, args.prompt, args.response
    rng = np.random.default_rng(0)
    mask = np.ones((B, P + R), np.int32)
    tokens = rng.integers(1, cfg.vocab_size, (B, P + R)).astype(np.int32)
    batch = Batch(tokens=tokens, attention_mask=mask, positions=positions_from_mask(mask),
                  response_mask=np.ones((B, R), np.float32),
                  advantages=rng.normal(size=B).astype(np.float32),
                  success_rate=np.repeat(rng.choice([0.0, 0.25, 1.0], B // 8), 8).astype(np.float32),
                  is_hard=np.zeros(B, np.float32))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    emit(bench="train_step_setup", device=jax.devices()[0].platform, jax=jax.__version__, batch=B,
         prompt=P, response=R, micro_batches=args.micro_batches, chunk_size=args.chunk_size, **TINY)

    runs = {}
    for method in ("grpo", "uec"):
        ts = TrainStep(model, loss_config(method, beta=0.0), OptimConfig(learning_rate=1e-6), mesh,
                       micro_batches=args.micro_batches, chunk_size=args.chunk_size)
        params, opt_state, control = ts.init(nnx.state(model))
        logp, entropy = ts.compute_logprobs(params, batch)
        b = batch.replace(old_logp=logp, old_entropy=entropy)
        start = time.perf_counter()
        *state, metrics = ts.step(params, opt_state, control, b)  # compile + first run
        jax.block_until_ready(metrics)
        runs[method] = dict(ts=ts, batch=b, state=state, first=time.perf_counter() - start, times=[])

    for _ in range(args.repeats):  # alternate, so that machine noise hits both alike
        for run in runs.values():
            start = time.perf_counter()
            *run["state"], metrics = run["ts"].step(*run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)

    best = {m: min(r["times"]) for m, r in runs.items()}
    median = {m: float(np.median(r["times"])) for m, r in runs.items()}
    for method, run in runs.items():
        emit(bench="train_step", method=method, step_s=round(best[method], 4),
             median_step_s=round(median[method], 4),
             response_tokens_per_s=round(B * R / best[method], 1),
             total_tokens_per_s=round(B * (P + R) / best[method], 1),
             first_call_s=round(run["first"], 2))
    emit(bench="train_step_overhead", compare="uec_vs_grpo",
         overhead_best=round(best["uec"] / best["grpo"] - 1, 4),
         overhead_median=round(median["uec"] / median["grpo"] - 1, 4))


def long_tailed_batch(cfg, B, P, R, sigma, seed=0):
    """Left-padded prompts of mixed lengths, right-padded log-normal responses (the longest = R)."""
    from uecjax.batch import Batch, positions_from_mask

    rng = np.random.default_rng(seed)
    prompt_len = rng.integers(max(P // 4, 1), P + 1, B)
    raw = rng.lognormal(0.0, sigma, B)
    resp_len = np.maximum(np.round(raw / raw.max() * R), 1).astype(int)
    mask = np.zeros((B, P + R), np.int32)
    for i in range(B):
        mask[i, P - prompt_len[i]:P + resp_len[i]] = 1
    tokens = np.where(mask > 0, rng.integers(1, cfg.vocab_size, (B, P + R)), 0).astype(np.int32)
    batch = Batch(tokens=tokens, attention_mask=mask, positions=positions_from_mask(mask),
                  response_mask=mask[:, P:].astype(np.float32),
                  advantages=rng.normal(size=B).astype(np.float32),
                  success_rate=np.repeat(rng.choice([0.0, 0.25, 1.0], B // 8), 8).astype(np.float32),
                  is_hard=np.zeros(B, np.float32))
    return batch, prompt_len, resp_len


def packing(args):
    import jax
    from flax import nnx

    from uecjax.models import Qwen2, TextConfig
    from uecjax.objectives.methods import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.parallel.mesh import make_mesh
    from uecjax.train_step import TrainStep

    cfg = TextConfig(**TINY)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    B, P, R = args.pack_batch, args.prompt, args.pack_response
    batch, prompt_len, resp_len = long_tailed_batch(cfg, B, P, R, args.pack_sigma)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    runs = {}
    for name, pack in (("padded", False), ("packed", True)):
        ts = TrainStep(model, loss_config("uec", beta=0.0), OptimConfig(learning_rate=1e-6), mesh,
                       micro_batches=args.micro_batches, chunk_size=args.chunk_size, pack=pack)
        params, opt_state, control = ts.init(nnx.state(model))
        placed = ts.place_batch(batch)
        logp, entropy = ts.compute_logprobs(params, placed)
        b = placed.replace(old_logp=logp, old_entropy=entropy)
        *state, metrics = ts.step(params, opt_state, control, b)  # compile + first run
        jax.block_until_ready(metrics)
        runs[name] = dict(ts=ts, batch=b, state=state, times=[])
    layout = runs["packed"]["batch"].packing
    emit(bench="packing_setup", batch=B, prompt=P, response=R, mean_prompt=float(prompt_len.mean()),
         mean_response=float(resp_len.mean()), max_over_mean_response=round(resp_len.max() / resp_len.mean(), 2),
         padded_slots=int(B * (P + R - 1)), packed_slots=int(np.asarray(layout.source).size),
         real_tokens=int(batch.attention_mask[:, :-1].sum()), head_on_slots=layout.head_on_slots)
    for _ in range(args.repeats):
        for run in runs.values():
            start = time.perf_counter()
            *run["state"], metrics = run["ts"].step(*run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
    real = float(batch.response_mask.sum())
    best = {name: min(run["times"]) for name, run in runs.items()}
    for name in runs:
        emit(bench="packing", layout=name, step_s=round(best[name], 4),
             median_step_s=round(float(np.median(runs[name]["times"])), 4),
             response_tokens_per_s=round(real / best[name], 1))
    speedup = best["padded"] / best["packed"]
    emit(bench="packing_speedup", packed_vs_padded=round(speedup, 3), goal=1.8, goal_met=speedup >= 1.8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--mem_batch", type=int, default=8)
    parser.add_argument("--mem_len", type=int, default=1024)
    parser.add_argument("--mem_hidden", type=int, default=1536)
    parser.add_argument("--mem_vocab", type=int, default=151936)
    parser.add_argument("--chunks", default="1024,512")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--micro_batches", type=int, default=1)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip_packing", action="store_true")
    parser.add_argument("--pack_batch", type=int, default=32)
    parser.add_argument("--pack_response", type=int, default=768)
    parser.add_argument("--pack_sigma", type=float, default=1.4)
    args = parser.parse_args()
    if not args.skip_memory:
        memory(args)
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_packing:
        packing(args)


if __name__ == "__main__":
    main()
