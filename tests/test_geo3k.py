"""The Geometry3K recipe on the 10 real samples (tests/data/geometry3k) with a tiny random
Qwen2.5-VL: loading, image preprocessing, VL prompts, sampling, rewards and a `uec` update;
`python -m uecjax.train --config=configs/geo3k.py` end to end; missing model / data paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_hf import write_tiny_vl
from train_helpers import host, single_mesh

from uecjax import checkpoint as ckpt
from uecjax.data import geometry3k_source, make_dataset
from uecjax.groups import group_stats
from uecjax.models import from_pretrained
from uecjax.objectives.methods import loss_config
from uecjax.optim import OptimConfig
from uecjax.rewards.grader import RewardGrader
from uecjax.rows import Rows
from uecjax.sampler import Sampler, SamplingParams
from uecjax.tokenizer import THINK_BOXED_INSTRUCTION, decode_responses, load_tokenizer, stop_token_ids
from uecjax.train_step import TrainStep
from uecjax.vision_inputs import (IMAGE_PAD, VISION_END, VISION_START, load_image_processor,
                                  render_record, stack_images)

REPO = Path(__file__).resolve().parent.parent
GEO3K = REPO / "tests" / "data" / "geometry3k"
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 112 * 112  # small images: 40..60 patches each


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint directory: weights, tokenizer, image processor."""
    path = tmp_path_factory.mktemp("geo3k") / "tiny-vl"
    write_tiny_vl(path, seed=1)
    return str(path)


def test_real_samples_through_one_uec_step(tiny_vl):
    records = list(make_dataset(geometry3k_source(GEO3K, split="samples"), shuffle=False, num_epochs=1))
    assert len(records) == 10 and all(len(r.images) == 1 for r in records)
    model, tokenizer = from_pretrained(tiny_vl), load_tokenizer(tiny_vl)
    processor = load_image_processor(tiny_vl, model.config.vision, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert type(processor.hf).__name__ == "Qwen2VLImageProcessorPil"  # from preprocessor_config.json
    prompts, images = zip(*(render_record(tokenizer, r, image_processor=processor) for r in records))

    for record, ids, im in zip(records, prompts, images):
        (t, h, w), = im.grid_thw.tolist()
        assert t == 1 and MIN_PIXELS <= h * w * 14 * 14 <= MAX_PIXELS and im.pixel_values.shape == (h * w, 1176)
        # transformers' own placeholder count for this image size (what vLLM uses too)
        assert h * w == processor.hf.get_number_of_image_patches(record.images[0].height, record.images[0].width)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        image = VISION_START + IMAGE_PAD * (h * w // 4) + VISION_END
        problem = record.prompt.replace("<image>", "").strip()
        assert f"<|im_start|>user\n{image}{problem}{THINK_BOXED_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n" in text

    G, R = 2, 48
    stops = stop_token_ids(tokenizer)
    out = Sampler(model, pad_id=tokenizer.pad_token_id)(
        list(prompts), SamplingParams(max_new_tokens=R, n=G, stop_token_ids=stops, seed=0), images=list(images))
    assert out.response_tokens.shape == (10 * G, R) and out.response_mask.sum() > 0
    # The random policy is never right: make the first response of each group the reference
    # solution, so the rewards (graded for real) and advantages are not all zero.
    tokens, mask = out.response_tokens.copy(), out.response_mask.copy()
    for q, record in enumerate(records):
        ids = tokenizer.encode(f"<think> </think> \\boxed{{{record.answer}}}", add_special_tokens=False)[:R - 1]
        ids.append(stops[0])
        tokens[q * G], mask[q * G] = tokenizer.pad_token_id, 0
        tokens[q * G, :len(ids)], mask[q * G, :len(ids)] = ids, 1
    texts = decode_responses(tokenizer, tokens, mask, stops)
    with RewardGrader(num_workers=1, format_weight=0.1) as grader:
        rewards = grader.grade_batch(texts, [r.answer for r in records for _ in range(G)],
                                     [r.choices for r in records for _ in range(G)]).result()
    reward = np.array([r.reward for r in rewards], np.float32)
    np.testing.assert_allclose(reward[::G], 1.0)  # 0.9 accuracy + 0.1 format
    assert reward[1::G].max() < 0.9

    out.response_tokens, out.response_mask = tokens, mask
    loss_cfg = loss_config("uec", beta=0.0)
    # The rollout's path: rows with their images, group statistics, scored by the trainer.
    rows = Rows.from_sampler(out, out.prompt_tokens.shape[1],
                             *stack_images([im for im in images for _ in range(G)], 1176))
    rows.reward = reward
    rows.accuracy = np.array([r.accuracy for r in rewards], np.float32)
    stats = group_stats(rows.reward, rows.accuracy, G, loss_cfg.advantage)
    rows.advantage, rows.success_rate = stats.advantage, stats.success_rate
    trainer = TrainStep(model, loss_cfg, OptimConfig(learning_rate=1e-3), single_mesh(), micro_batches=2)
    params, opt_state, control = trainer.init(nnx.state(model))
    rows.old_logp, rows.old_entropy, _ = trainer.score(params, rows)
    batch = trainer.device_batch(rows)
    assert batch.positions.shape == (10 * G, 3, batch.tokens.shape[1]) and batch.pixel_values.shape[1] == 64
    before = host(params)
    params, opt_state, control, metrics = trainer.step(params, opt_state, control, batch)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    assert np.isfinite(list(metrics.values())).all() and metrics["grad_norm"] > 0
    assert metrics["seqs"] == 10 * G
    moved = host(params)
    assert not np.array_equal(before["visual"]["patch_w"], moved["visual"]["patch_w"])  # the tower trains


def _train_cli(*flags, workdir, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "uecjax.train", "--config=configs/geo3k.py",
                           f"--workdir={workdir}", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_geo3k_config_trains_two_steps_end_to_end(tiny_vl, tmp_path):
    """The recipe's config with a tiny VLM and the real samples, small sizes from flags. The
    random policy earns no reward, so `uec`'s selective retention would leave only weightless
    padding rows to train on; `grpo` trains on every sampled row, so the loop's steps run on
    rows with images (the `uec` update on such rows is the test above)."""
    run = tmp_path / "run"
    result = _train_cli(
        "--config.method=grpo", f"--config.model.path={tiny_vl}", f"--config.data.path={GEO3K}", "--config.data.train_split=samples",
        "--config.data.eval_split=samples", "--config.model.dtype=float32", "--config.model.remat=False",
        f"--config.vision.min_pixels={MIN_PIXELS}", f"--config.vision.max_pixels={MAX_PIXELS}",
        "--config.rollout.prompts_per_batch=2", "--config.rollout.group_size=2",
        "--config.rollout.max_prompt_len=512", "--config.rollout.max_new_tokens=8",
        "--config.rollout.explore_samples=2", "--config.rollout.max_rounds=1", "--config.train.steps=2",
        "--config.train.micro_batches=1", "--config.train.checkpoint_every=1", "--config.train.eval_every=0",
        "--config.eval.num_prompts=2", "--config.eval.n=2", "--config.eval.max_new_tokens=8",
        "--config.eval.batch_prompts=2", "--config.reward.num_workers=1", "--config.mesh.num_devices=1",
        workdir=run)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Qwen2.5-VL policy: vision tower trained" in result.stdout
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["sampled_tokens"] > 0 and r["tokens"] > 0 and r["data/skipped"] == 0 for r in steps)
    assert any("eval/pass@2" in r for r in rows) and os.listdir(run / "tensorboard")
    assert all(r["updates"] == 4 for r in steps)  # the recipe's four updates per rollout
    # Checkpoints are numbered by optimizer updates: 2 rollouts x 4.
    assert ckpt.Checkpointer(str(run / "checkpoints"), read_only=True).latest_step() == 8
    export = run / "export"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json"} <= set(os.listdir(export))
    assert json.load(open(export / "config.json"))["model_type"] == "qwen2_5_vl"

    # The exported VL policy evaluates with its images through the evaluation CLI.
    result = subprocess.run(
        [sys.executable, "-m", "uecjax.evaluate", "--config=configs/geo3k.py", f"--checkpoint={export}",
         f"--config.data.path={GEO3K}", "--split=samples", "--n=2", "--num_prompts=3",
         "--config.eval.max_new_tokens=8", "--config.model.dtype=float32",
         f"--config.vision.min_pixels={MIN_PIXELS}", f"--config.vision.max_pixels={MAX_PIXELS}",
         "--config.reward.num_workers=1"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["num_prompts"] == 3 and metrics["skipped_prompts"] == 0 and "pass@2" in metrics


def test_missing_model_and_data_print_the_download_commands(tmp_path):
    model, data = tmp_path / "Qwen2.5-VL-3B-Instruct", tmp_path / "geometry3k"
    result = _train_cli(f"--config.model.path={model}", f"--config.data.path={data}", workdir=tmp_path / "run",
                        timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert f"huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir {model}" in result.stderr
    assert f"huggingface-cli download hiyouga/geometry3k --repo-type dataset --local-dir {data}" in result.stderr


def test_vision_input_mistakes_say_what_to_fix(tiny_vl):
    from PIL import Image

    from uecjax.config import ConfigValueError, validate
    from uecjax.data import Record, SkipCounter
    from uecjax.setup import prompt_stream
    from uecjax.vision_inputs import ImageError, VisionInputError, render_vl_prompt

    model, tokenizer = from_pretrained(tiny_vl), load_tokenizer(tiny_vl)
    with pytest.raises(VisionInputError, match="min_pixels=100, vision.max_pixels=10"):
        load_image_processor(tiny_vl, model.config.vision, min_pixels=100, max_pixels=10)
    processor = load_image_processor(tiny_vl, model.config.vision, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    image = processor([Image.new("RGB", (60, 60))])
    with pytest.raises(ImageError, match="2 <image> placeholders but 1 images"):
        render_vl_prompt(tokenizer, "<image> and <image>", image, merge_size=2)
    plain = load_tokenizer(tiny_vl)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # not a VL template
    with pytest.raises(VisionInputError, match=re.escape("wrote 0 <|image_pad|> for 1 images")):
        render_vl_prompt(plain, "<image>x", image, merge_size=2)
    with pytest.raises(ValueError, match="images were given but the model is a text model"):
        Sampler(model.language_model)([[1, 2]], SamplingParams(max_new_tokens=1), images=[image])

    # An image the processor rejects (aspect ratio > 200) skips its record, counted.
    cfg = _geo3k_config()
    skipped = SkipCounter()
    records = [Record("<image>thin", "1", images=(Image.new("RGB", (1000, 2)),)),
               Record("<image>fine", "2", images=(Image.new("RGB", (60, 60)),))]
    prompts = list(prompt_stream(records, tokenizer, cfg, 512, skipped, processor))
    assert [p.answer for p in prompts] == ["2"] and skipped.as_dict() == {"skipped": 1, "skipped/bad_image": 1}

    cfg.vision.max_pixels = 1000
    with pytest.raises(ConfigValueError, match=r"config.vision.max_pixels=1000: must be an integer >= vision.min_pixels=262144"):
        validate(cfg)


def _geo3k_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("geo3k_config", REPO / "configs" / "geo3k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
