"""Qwen2.5-VL benchmarks on CPU, one JSON line per figure, references timed in the same process.

    python experiments/benchmarks/vlm.py [--resolutions 224,448,672] [--skip_transformers]

Config: the sampler benchmark's decoder (vocab 8192, hidden 256, intermediate 704, 4 layers,
8 heads, 2 KV heads, tied) with a small Qwen2.5-VL vision tower (4 blocks, hidden 128, 4 heads,
MLP 256, patches of 14, 2x2 merge, windows of 112 px, blocks 1 and 3 attending whole images),
random weights, float32, PyTorch with --threads threads and SDPA attention.

(a) vision tower, ms per image at each resolution (square RGB images through the Qwen2-VL
    image processor: 224^2 -> 256 patches, 448^2 -> 1024, 672^2 -> 2304): uecjax's jitted
    tower on one image's exact layout and on its padded patch bucket (what the sampler and the
    train step run), against transformers' `get_image_features` on the same weights.
(b) sampler: batch 8 prompts, each one 448^2 image (256 image tokens) + 32 text tokens, 64 new
    tokens forced at T = 1; generated tokens/s and the prefill's share, against transformers'
    generate (use_cache=True) on the same inputs; recompiles over 5 batches of other image
    sizes inside the same patch bucket.
(c) train step: 8 prompts x G = 2 with a 224^2 image (64 image tokens) + 32 text tokens,
    responses of 64 tokens: response tokens/s of a `grpo` and a `uec` step with the tower
    trained and frozen, and a text-only batch of the same token count for the vision cost.
Throughput is the best of --repeats timed calls after a compile call; the timings compared
in one figure are taken round-robin, so that the shared machine's load hits them alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

TEXT = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1e6})
VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
              patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
              fullatt_block_indexes=[1, 3], in_channels=3)
TOKENS = dict(image_token_id=8000, video_token_id=8001, vision_start_token_id=8002,
              vision_end_token_id=8003)


def emit(**fields):
    print(json.dumps(fields), flush=True)


def best_times(fns: dict, repeats: int) -> dict:
    """Best time of each function, timed round-robin so that load changes on a shared machine
    hit all of them alike (every function was called once before: compiled, warmed up)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def build(seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(text_config={**TEXT, "bos_token_id": None, "eos_token_id": None,
                                           "tie_word_embeddings": True},
                              vision_config=VISION, tie_word_embeddings=True, **TOKENS)
    config._attn_implementation = "sdpa"  # transformers' default and its fastest CPU path
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = tempfile.mkdtemp(prefix="uecjax-vlm-bench-")
    model.save_pretrained(path)
    return model, path


def images_at(processor, rng, side: int, count: int = 1):
    from PIL import Image

    return [processor([Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))])
            for _ in range(count)]


def prompt(rng, images, before: int = 16, after: int = 16) -> list[int]:
    ids = rng.integers(1, 7999, before).tolist()
    for n in images.tokens_per_image(2):
        ids += [TOKENS["vision_start_token_id"]] + [TOKENS["image_token_id"]] * n + [TOKENS["vision_end_token_id"]]
    return ids + rng.integers(1, 7999, after).tolist()


def vision_tower(args, hf, model, processor, rng):
    import torch
    from flax import nnx

    from uecjax.models import padded_vision_layout
    from uecjax.vision_inputs import patch_bucket

    tower = nnx.jit(lambda m, p, lay: m.image_features(p, lay))
    for side in (int(s) for s in args.resolutions.split(",")):
        im = images_at(processor, rng, side)[0]
        layout = model.vision_layout(im.grid_thw)
        N = patch_bucket(im.num_patches)
        padded = np.pad(im.pixel_values, ((0, N - im.num_patches), (0, 0)))
        bucket_layout = padded_vision_layout(im.grid_thw, model.config.vision, N)
        fns = {"exact": lambda: tower(model, im.pixel_values, layout).block_until_ready(),
               "bucketed": lambda: tower(model, padded, bucket_layout).block_until_ready()}
        if not args.skip_transformers:
            pv, grid = torch.tensor(im.pixel_values), torch.tensor(im.grid_thw)

            def reference():
                with torch.no_grad():
                    hf.model.get_image_features(pv, grid)
            fns["transformers"] = reference
        for fn in fns.values():
            fn()
        t = best_times(fns, args.repeats)
        row = dict(figure="vision_tower_ms_per_image", resolution=f"{side}x{side}",
                   patches=im.num_patches, image_tokens=im.num_patches // 4, patch_bucket=N,
                   uecjax_ms=round(1e3 * t["exact"], 2), uecjax_bucketed_ms=round(1e3 * t["bucketed"], 2))
        if "transformers" in t:
            row.update(transformers_ms=round(1e3 * t["transformers"], 2),
                       speedup=round(t["transformers"] / t["exact"], 2))
        emit(**row)


def sampler(args, hf, model, processor, rng):
    import torch

    from uecjax.sampler import Sampler, SamplingParams

    B, new = 8, 64
    images = images_at(processor, rng, 448, B)
    prompts = [prompt(rng, im) for im in images]
    s = Sampler(model)
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=1)
    start = time.perf_counter()
    s(prompts, params, images=images)
    first = time.perf_counter() - start
    one = SamplingParams(max_new_tokens=1)  # prefill, host-side inputs and one decode step
    fns = {"sample": lambda: s(prompts, params, images=images),
           "prefill": lambda: s(prompts, one, images=images)}
    if not args.skip_transformers:
        ids = torch.tensor(prompts)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                      pixel_values=torch.tensor(np.concatenate([im.pixel_values for im in images])),
                      image_grid_thw=torch.tensor(np.concatenate([im.grid_thw for im in images])),
                      mm_token_type_ids=(ids == TOKENS["image_token_id"]).long(), max_new_tokens=new,
                      min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                      use_cache=True, pad_token_id=0)

        def reference():
            with torch.no_grad():
                hf.generate(**kwargs)
        fns["transformers"] = reference
    for fn in list(fns.values())[1:]:
        fn()
    t = best_times(fns, args.repeats)
    row = dict(figure="sampler_with_images", batch=B, image="448x448", image_tokens=images[0].num_patches // 4,
               prompt_tokens=len(prompts[0]), new_tokens=new, uecjax_tokens_per_s=round(B * new / t["sample"], 1),
               uecjax_s=round(t["sample"], 3), uecjax_prefill_s=round(t["prefill"], 3),
               uecjax_first_call_s=round(first, 2))
    if "transformers" in t:
        row.update(transformers_tokens_per_s=round(B * new / t["transformers"], 1),
                   transformers_s=round(t["transformers"], 3), speedup=round(t["transformers"] / t["sample"], 2))
    emit(**row)

    # Other image sizes in the same buckets: patches (1024: 896..1024 here) and prompt (512).
    compiles = s.compile_count
    from PIL import Image

    for h, w in ((392, 448), (448, 420), (420, 420), (420, 448), (448, 392)):
        batch = [processor([Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))]) for _ in range(B)]
        s([prompt(rng, im) for im in batch], params, images=batch)
    emit(figure="sampler_recompiles_5_batches_other_image_sizes_one_patch_bucket",
         value=s.compile_count - compiles)


def train_step(args, model, processor, rng):
    import jax
    from flax import nnx

    from uecjax.batch import Batch, positions_from_mask
    from uecjax.objectives import group_advantages
    from uecjax.objectives.methods import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.parallel.mesh import make_mesh
    from uecjax.train_step import TrainStep
    from uecjax.vision_inputs import stack_images, vision_rows

    prompts_n, G, R = 8, 2, 64
    images = images_at(processor, rng, 224, prompts_n)
    prompts = [prompt(rng, im) for im in images]
    P = max(map(len, prompts))
    B = prompts_n * G
    tokens, mask = np.zeros((B, P + R), np.int32), np.zeros((B, P + R), np.int32)
    for i in range(B):
        ids = prompts[i // G]
        tokens[i, P - len(ids):P], tokens[i, P:] = ids, rng.integers(1, 7999, R)
        mask[i, P - len(ids):] = 1
    rows = vision_rows(tokens, mask, *stack_images([im for im in images for _ in range(G)], 1176),
                       model.config, prompt_len=P)
    common = dict(tokens=tokens, attention_mask=mask, response_mask=mask[:, P:].astype(np.float32),
                  advantages=np.asarray(group_advantages(rng.integers(0, 2, B).astype(np.float32), G)),
                  success_rate=np.full(B, 0.5, np.float32), is_hard=np.zeros(B, np.float32))
    vl_batch = Batch(positions=rows.positions, pixel_values=rows.pixel_values, vision=rows.layouts, **common)
    text_tokens = np.where(tokens == TOKENS["image_token_id"], 5, tokens)  # same length, no images
    text_batch = Batch(**{**common, "tokens": text_tokens}, positions=positions_from_mask(mask))
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cases = [("grpo", (), vl_batch, "images"), ("uec", (), vl_batch, "images"),
             ("uec", ("visual",), vl_batch, "images, tower frozen"), ("uec", (), text_batch, "text only")]
    steps, first = {}, {}
    for method, frozen, batch, inputs in cases:
        loss_cfg = loss_config(method, beta=0.0)
        ts = TrainStep(model, loss_cfg, OptimConfig(learning_rate=1e-5, frozen=frozen), mesh)
        params, opt_state, control = ts.init(nnx.state(model))
        logp, entropy = ts.compute_logprobs(params, batch)
        batch = batch.replace(old_logp=np.asarray(logp), old_entropy=np.asarray(entropy))

        def step(ts=ts, batch=batch, state=[params, opt_state, control]):
            out = ts.step(*state, batch)
            jax.block_until_ready(out[3])
            state[:3] = out[:3]

        start = time.perf_counter()
        step()
        first[method, inputs] = time.perf_counter() - start
        steps[method, inputs] = step
    times = best_times(steps, args.repeats)  # round-robin over the four cases
    for (method, inputs), run in times.items():
        emit(figure="train_step", method=method, inputs=inputs, rows=B, prompt_tokens=P, response_tokens=R,
             image_tokens=images[0].num_patches // 4, response_tokens_per_s=round(B * R / run, 1),
             step_s=round(run, 3), first_call_s=round(first[method, inputs], 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", default="224,448,672")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_transformers", action="store_true")
    parser.add_argument("--only", default="vision,sampler,train", help="comma-separated parts to run")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    hf, path = build()

    import jax

    from uecjax.models import from_pretrained
    from uecjax.vision_inputs import load_image_processor

    model = from_pretrained(path)
    processor = load_image_processor(None, model.config.vision, min_pixels=56 * 56, max_pixels=1024 * 1024)
    emit(bench="vlm", device=str(jax.devices()[0].platform), jax=jax.__version__, torch=torch.__version__,
         threads=args.threads, text=TEXT, vision=VISION)
    rng = np.random.default_rng(0)
    parts = args.only.split(",")
    if "vision" in parts:
        vision_tower(args, hf, model, processor, rng)
    if "sampler" in parts:
        sampler(args, hf, model, processor, rng)
    if "train" in parts:
        train_step(args, model, processor, rng)


if __name__ == "__main__":
    main()
