r"""Evaluation: greedy Pass@1 and sampled Pass@k on held-out problems (ALGORITHMS.md section 10).

From Python (the training loop's periodic validation uses the same function):

    metrics = evaluate(Sampler(model, pad_id=tok.pad_token_id), tok, records, grader,
                       n=8, max_new_tokens=64)
    # {"greedy_pass@1": .., "pass@1": .., "pass@2": .., "pass@4": .., "pass@8": .., "reward": ..,
    #  "accuracy": .., "format": .., "response_length": .., "truncated": .., "num_prompts": .., ...}

From the shell, on an exported checkpoint (Hugging Face layout: config.json, *.safetensors and
the tokenizer files, as `save_pretrained` + `tokenizer.save_pretrained` write them):

    python -m uecjax.evaluate --config=configs/demo.py --checkpoint=DIR [--split=test] [--n=8]
        [--num_prompts=N] [--output=metrics.json] [--config.eval.temperature=0.6 ...]

It prints one JSON line with the metrics on stdout (the progress bar goes to stderr).
The checkpoint loads onto the config's mesh (config.mesh, as in training: parameters laid
out by `uecjax.parallel.mesh`), and the sampler splits its rows over the mesh's data x fsdp devices.
Launched as part of a multi-process job (`uecjax.parallel.launch`: TPU slice, SLURM, or the
--coordinator_address / --num_processes / --process_id flags) it joins the job first; every
process then runs the same evaluation over the global mesh, grading its own block of every
batch's prompts (`uecjax.parallel.hosts`), the per-prompt results are all-gathered, and
process 0 prints and writes.

Metrics. Every prompt gets one greedy response (temperature 0) and `n` sampled responses
(`temperature`, `top_p`), graded by the reward function (`uecjax.rewards`):

    greedy_pass@1           mean greedy accuracy
    pass@k                  mean over prompts of the unbiased 1 - C(n - c, k) / C(n, k), c the
                            number of correct samples, for k = 1, 2, 4, ... up to n (or `ks`);
                            pass@1 equals the mean sampled accuracy
    accuracy, reward, format, response_length (tokens, stop token included), truncated
                            means over the sampled responses (rate of responses that hit
                            max_new_tokens without a stop token)
    greedy_reward, greedy_format, greedy_response_length, greedy_truncated   the same, greedy
    num_prompts, n, seconds

Prompts are rendered with `uecjax.tokenizer.render_prompt` (prompt template, chat template);
responses are decoded with special tokens kept (`<think>` of the char tokenizer is one) and the
final stop token removed.

Config fields read by the CLI (the training configs define them; optional ones have defaults):

    config.model.path           HF checkpoint directory of the initial policy; for the demo
                                the directory the demo preparation writes (WORKDIR/demo_init).
                                Default of --checkpoint, and the tokenizer's fallback when
                                --checkpoint holds no tokenizer files.
    config.model.dtype          optional, compute dtype ("float32")
    config.mesh.data, .fsdp, .tensor, .num_devices
                                optional, the device mesh (`uecjax.run_setup.run_mesh`;
                                default: data over all devices)
    config.data.kind            "demo" | "countdown" | "geometry3k" | "math" | "jsonl"
    config.data.path            data file / glob / directory (not used by "demo", "countdown")
    config.data.eval_split      optional, default of --split ("test")
    config.data.prompt_field, config.data.answer_field
                                optional, jsonl field names ("problem", "answer")
    config.demo_data.levels, .style, .num_eval, .heldout_percent (seed: config.seed)
                                demo only: arguments of `demo_records` for the evaluated split,
                                as configs/demo.py sets them (defaults (1, 2, 3, 4), "word",
                                256, 20), so the CLI sees the training loop's held-out records.
                                Without config.demo_data: config.data.levels, .style, .seed,
                                .heldout_percent. (The warm-up's own levels are a setting of
                                `uecjax.demo_model.prepare_demo_policy`, config.demo.)
    config.countdown_data.levels, .num_eval, .seed, .heldout_percent
                                countdown only: arguments of `countdown_records` for the
                                evaluated split, as configs/countdown.py sets them; graded
                                by `uecjax.rewards.CountdownGrader` (in process)
    config.eval.n               samples per prompt for Pass@k (--n overrides)
    config.eval.max_new_tokens  response budget
    config.eval.temperature     sampling temperature of the n samples
    config.eval.top_p           optional (1.0)
    config.eval.batch_prompts   prompts per sampler call
    config.eval.num_prompts     first N records of the split (0: all; for the generated demo
                                demo_data.num_eval; --num_prompts overrides)
    config.prompt.template      "think_boxed" | "plain" (uecjax.tokenizer.PROMPT_TEMPLATES)
    config.prompt.use_chat_template
    config.reward.format_weight, .timeout_s, .think_prefilled, .num_workers
                                optional, `RewardGrader` settings (0.1, 5.0, False, half the
                                cores)
    config.seed                 optional, seed of the sampled responses (0)

    config.vision.min_pixels, .max_pixels
                                optional, image bounds of a Qwen2.5-VL checkpoint (262144,
                                4194304)

A Qwen2.5-VL checkpoint is evaluated with its images (the image processor of the checkpoint,
or of config.model.path, with the config's pixel bounds); a text model sees Geometry3K rows as
text, the `<image>` placeholders left in the prompt. Records whose images fail to preprocess
are skipped and counted (`skipped_prompts`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Sequence

import numpy as np

from uecjax.config import DATA_KINDS
from uecjax.metrics import pass_at_k_table
from uecjax.sampler import SamplingParams
from uecjax.parallel.hosts import Hosts
from uecjax.tokenizer import decode_responses, load_tokenizer, stop_token_ids
from uecjax.vision_inputs import ImageError, render_record, vl_chat_template

logger = logging.getLogger(__name__)



def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n itself last when it is not a power of two)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def _seed(seed: int, index: int) -> int:
    """Independent sampler seed for batch `index` of a run with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


def evaluate(sampler, tokenizer, records, grader, *, n: int = 8, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, batch_prompts: int = 32,
             prompt_template: str = "think_boxed", use_chat_template: bool = True,
             seed: int = 0, ks: Sequence[int] | None = None, progress: bool = True,
             greedy: bool = True, image_processor=None, hosts: Hosts = Hosts()) -> dict:
    """Greedy Pass@1 and sampled Pass@k of `sampler`'s model on `records` (module docstring).

    sampler: a `uecjax.sampler.Sampler` (reads the model's current parameters at each call).
    records: objects with `.prompt`, `.answer` and optional `.choices` (`uecjax.data.Record`).
    grader: a `uecjax.rewards.RewardGrader` (anything with `grade_batch(responses, answers,
      choices) -> Future[list[Reward]]`); None makes a default one for this call.
    Grading of a batch runs in the grader's workers while the next batch is sampled.
    ks: the k of Pass@k (default 1, 2, 4, ... up to n); every k must be <= n.
    greedy: also the greedy response per prompt (greedy_* metrics).
    image_processor: a `uecjax.vision_inputs.ImageProcessor` for a Qwen2.5-VL policy: records
      with images are prompted with them; None prompts every record as text.
    hosts: with several row shares (`Hosts.of_mesh`, a multi-process run) each process keeps,
      grades and reports its block of every batch's prompts, and the per-prompt results are
      all-gathered (`hosts.gather`) so every process returns the same metrics.
    """
    records = list(records)
    if not records:
        raise ValueError("evaluate: no records")
    if n < 1 or batch_prompts < 1:
        raise ValueError(f"evaluate: n={n} and batch_prompts={batch_prompts} must be >= 1")
    ks = list(ks) if ks is not None else default_ks(n)
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"evaluate: ks={ks} must lie in 1..n={n}")
    own_grader = grader is None
    if own_grader:
        from uecjax.rewards import RewardGrader
        grader = RewardGrader()
    start = time.perf_counter()
    stops = stop_token_ids(tokenizer)
    kept, prompts, images = [], [], []
    for r in records:
        try:
            ids, ims = render_record(tokenizer, r, template=prompt_template,
                                     use_chat_template=use_chat_template,
                                     image_processor=image_processor)
        except ImageError as e:
            logger.warning("evaluate: skipping %s: %s", r.id, e)
            continue
        kept.append(r)
        prompts.append(ids)
        images.append(ims)
    skipped, records = len(records) - len(kept), kept
    if not records:
        raise ValueError(f"evaluate: all {skipped} records were skipped (their images failed)")
    num_batches = -(-len(records) // batch_prompts)
    # Per prompt index: greedy (reward, length, truncated) and the n samples' (rewards,
    # lengths, truncated); with several row shares, of this process's prompts only.
    futures, results = [], {}
    try:
        from tqdm import tqdm

        with tqdm(total=len(records), desc="eval", unit="prompt", file=sys.stderr,
                  disable=not progress, leave=False) as bar:
            for b in range(num_batches):
                lo, hi = b * batch_prompts, min(len(records), (b + 1) * batch_prompts)
                # `hosts.count` equal blocks (the last padded with the batch's first prompt);
                # this process samples all of them in one collective call, keeps its block.
                k = -(-(hi - lo) // hosts.count)
                index = list(range(lo, hi)) + [lo] * (k * hosts.count - (hi - lo))
                batch = [prompts[i] for i in index]
                batch_images = ([images[i] for i in index]
                                if any(im is not None for im in images[lo:hi]) else None)
                mine = [i for j, i in enumerate(index[hosts.index * k:(hosts.index + 1) * k])
                        if hosts.index * k + j < hi - lo]
                responses, lengths = [], {}
                if greedy:
                    out = sampler(batch, SamplingParams(max_new_tokens=max_new_tokens,
                                                        temperature=0.0, stop_token_ids=stops),
                                  images=batch_images, hosts=hosts)
                    rows = slice(0, len(mine))
                    responses += decode_responses(tokenizer, out.response_tokens[rows],
                                                  out.response_mask[rows], stops)
                    lengths["greedy"] = (out.response_lengths[rows], out.truncated[rows])
                out = sampler(batch, SamplingParams(max_new_tokens=max_new_tokens,
                                                    temperature=temperature, top_p=top_p, n=n,
                                                    stop_token_ids=stops, seed=_seed(seed, b)),
                              images=batch_images, hosts=hosts)
                rows = slice(0, len(mine) * n)
                responses += decode_responses(tokenizer, out.response_tokens[rows],
                                              out.response_mask[rows], stops)
                lengths["sampled"] = (out.response_lengths[rows], out.truncated[rows])
                recs = [records[i] for i in mine]
                copies = ([1] if greedy else []) + [n]  # greedy rows first, then samples
                answers = [r.answer for c in copies for r in recs for _ in range(c)]
                choices = [tuple(getattr(r, "choices", ()) or ()) for c in copies for r in recs
                           for _ in range(c)]
                futures.append((mine, lengths, grader.grade_batch(responses, answers, choices)))
                bar.update(hi - lo)
        for mine, lengths, future in futures:
            rewards = future.result()
            g = len(mine) if greedy else 0
            for j, i in enumerate(mine):
                one = {"sampled": _graded(rewards[g + j * n: g + (j + 1) * n],
                                          *(x[j * n:(j + 1) * n] for x in lengths["sampled"]))}
                if greedy:
                    one["greedy"] = _graded(rewards[j:j + 1], *(x[j:j + 1] for x in lengths["greedy"]))
                results[i] = one
    finally:
        if own_grader:
            grader.close()
    if hosts.count > 1:  # every process's prompts, so that all compute the same metrics
        for part in hosts.gather(results):
            results.update(part)

    num = len(records)
    per_prompt = [results[i] for i in range(num)]
    sampled = {key: np.stack([r["sampled"][key] for r in per_prompt]) for key in per_prompt[0]["sampled"]}
    acc = sampled["accuracy"]
    metrics = {}
    if greedy:
        greedy_rows = {key: np.stack([r["greedy"][key] for r in per_prompt]) for key in per_prompt[0]["greedy"]}
        metrics["greedy_pass@1"] = float(greedy_rows["accuracy"].mean())
    metrics.update(pass_at_k_table(acc > 0.5, ks))
    metrics.update(
        accuracy=float(acc.mean()),
        reward=float(sampled["reward"].mean()),
        format=float(sampled["format"].mean()),
        response_length=float(sampled["length"].mean()),
        truncated=float(sampled["truncated"].mean()),
    )
    if greedy:
        metrics.update(
            greedy_reward=float(greedy_rows["reward"].mean()),
            greedy_format=float(greedy_rows["format"].mean()),
            greedy_response_length=float(greedy_rows["length"].mean()),
            greedy_truncated=float(greedy_rows["truncated"].mean()),
        )
    metrics.update(num_prompts=num, n=n, skipped_prompts=skipped, seconds=time.perf_counter() - start)
    return metrics


def _graded(rewards, lengths, truncated) -> dict:
    """One prompt's responses as arrays: accuracy, reward, format, length, truncated."""
    return {"accuracy": np.array([r.accuracy for r in rewards], np.float64),
            "reward": np.array([r.reward for r in rewards], np.float64),
            "format": np.array([r.format for r in rewards], np.float64),
            "length": np.asarray(lengths, np.float64), "truncated": np.asarray(truncated, np.float64)}


# ----------------------------------------------------------------------------- CLI helpers


def _get(cfg, dotted: str, default=None):
    """config value at `a.b.c`, or `default` when a part is missing."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part] if hasattr(node, "__getitem__") else getattr(node, part)
        except (KeyError, AttributeError, TypeError):
            return default
    return node


def _require(cfg, dotted: str):
    value = _get(cfg, dotted)
    if value is None:
        raise ValueError(f"config.{dotted} is not set; the evaluation needs it "
                         "(see `python -m uecjax.evaluate --helpfull` and the module docstring)")
    return value


def eval_records(config, split: str = "test", num_prompts: int | None = None) -> list:
    """The records of `split` that `config.data` names, the first `num_prompts` of them
    (default config.eval.num_prompts; 0: all): the training loop's own loader
    (`uecjax.run_setup.make_records`), so its periodic validation and this CLI see the same
    problems."""
    from uecjax.run_setup import make_records

    if config.data.kind not in DATA_KINDS:
        raise ValueError(f"config.data.kind={config.data.kind!r}: choose from {DATA_KINDS}")
    if num_prompts is not None:
        config = config.copy_and_resolve_references()
        config.eval.num_prompts = num_prompts
    return make_records(config, split, train=False)


def _load_checkpoint(checkpoint: str, config, mesh=None):
    """(model, tokenizer, image processor or None); with a mesh, the parameters are laid out
    on it as in training (`uecjax.parallel.mesh.model_sharding_fn`), after `check_model_mesh`."""
    from uecjax.models import VLConfig, from_pretrained
    from uecjax.models.config import model_config_from_hf, read_hf_config
    from uecjax.parallel.mesh import check_model_mesh, model_sharding_fn

    if not checkpoint:
        raise FileNotFoundError("no checkpoint: pass --checkpoint=DIR (an HF-layout directory, "
                                "as the training loop exports) or set config.model.path")
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(
            f"--checkpoint={checkpoint}: directory not found. Pass an HF-layout directory "
            "(config.json, *.safetensors and tokenizer files), such as the final policy the "
            "training loop exports or, for the demo, WORKDIR/demo_init.")
    if not os.path.exists(os.path.join(checkpoint, "config.json")):
        raise FileNotFoundError(
            f"--checkpoint={checkpoint}: no config.json there. It must be a Hugging Face layout "
            "directory (config.json + *.safetensors), not an orbax training checkpoint.")
    # As in training (run_setup.load_policy): Qwen2.5-VL with its vision tower, other VL
    # families on their decoder.
    with open(os.path.join(checkpoint, "config.json")) as f:
        text_only = json.load(f).get("model_type") != "qwen2_5_vl"
    placement = {}
    if mesh is not None:
        shape = model_config_from_hf(read_hf_config(checkpoint), language_model_only=text_only,
                                     source=os.path.join(checkpoint, "config.json"))
        text = shape.text if isinstance(shape, VLConfig) else shape
        for warning in check_model_mesh(text, mesh):
            logger.warning("%s", warning)
        placement = {"sharding_fn": model_sharding_fn(mesh, shape)}
    model = from_pretrained(checkpoint, dtype=_get(config, "model.dtype", "float32"),
                            language_model_only=text_only, **placement)
    source_dirs = [checkpoint] + [p for p in [_get(config, "model.path")] if p and p != checkpoint]
    processor = None
    if not text_only:
        from uecjax.vision_inputs import load_image_processor

        preprocessor = next((d for d in source_dirs
                             if os.path.exists(os.path.join(d, "preprocessor_config.json"))), None)
        processor = load_image_processor(preprocessor, model.config.vision,
                                         min_pixels=_get(config, "vision.min_pixels", 262144),
                                         max_pixels=_get(config, "vision.max_pixels", 4194304))
    for d in source_dirs:
        if any(os.path.exists(os.path.join(d, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            tokenizer = load_tokenizer(d)
            template = None if text_only else vl_chat_template(d)
            if template:
                tokenizer.chat_template = template
            return model, tokenizer, processor
    raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in "
                            f"{' or '.join(source_dirs)}; save the tokenizer next to the weights "
                            "(tokenizer.save_pretrained(DIR))")


def main(argv) -> None:
    from absl import flags

    from uecjax.rewards import make_grader
    from uecjax.sampler import Sampler
    from uecjax.run_setup import run_mesh
    from uecjax.parallel.mesh import make_mesh

    from uecjax import cli
    from uecjax.parallel import launch
    from uecjax.parallel.hosts import is_main_process

    del argv
    FLAGS = flags.FLAGS
    try:
        launch.initialize_from_flags()  # before anything touches a device
    except launch.DistributedError as e:
        cli.fail(str(e))
    config = FLAGS.config  # cli.config_flags_parser has loaded it (or exited)
    checkpoint = FLAGS.checkpoint or _get(config, "model.path")
    split = FLAGS.split or _get(config, "data.eval_split") or "test"
    try:
        mesh = run_mesh(config) if _get(config, "mesh") is not None else make_mesh()
        model, tokenizer, processor = _load_checkpoint(checkpoint, config, mesh)
        records = eval_records(config, split, FLAGS.num_prompts)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e))
    n = FLAGS.n or _get(config, "eval.n", 8)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    grader = make_grader(_get(config, "data.kind"), num_workers=_get(config, "reward.num_workers"),
                         format_weight=_get(config, "reward.format_weight", 0.1),
                         timeout_s=_get(config, "reward.timeout_s", 5.0),
                         think_prefilled=_get(config, "reward.think_prefilled", False))
    hosts = Hosts.of_mesh(mesh)  # each process grades its own block of every batch
    with grader:
        metrics = evaluate(
            Sampler(model, pad_id=pad_id, mesh=mesh), tokenizer, records, grader, n=n,
            max_new_tokens=_require(config, "eval.max_new_tokens"),
            temperature=_get(config, "eval.temperature", 1.0),
            top_p=_get(config, "eval.top_p", 1.0),
            batch_prompts=_get(config, "eval.batch_prompts", 32),
            prompt_template=_get(config, "prompt.template", "think_boxed"),
            use_chat_template=_get(config, "prompt.use_chat_template", True),
            seed=_get(config, "seed", 0), progress=is_main_process(),
            image_processor=processor, hosts=hosts)
    metrics = {"checkpoint": os.path.abspath(checkpoint), "split": split, **metrics}
    line = json.dumps(metrics)
    if not is_main_process():  # every process computed the same metrics
        return
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py).")
    flags.DEFINE_string("checkpoint", None, "HF-layout checkpoint directory (default: "
                        "config.model.path).")
    flags.DEFINE_string("split", None, "Data split to evaluate (default: config.data.eval_split, "
                        "else test).")
    flags.DEFINE_integer("n", None, "Samples per prompt for Pass@k (default: config.eval.n).")
    flags.DEFINE_integer("num_prompts", None, "Evaluate the first N records (default: "
                         "config.eval.num_prompts; 0: all).")
    flags.DEFINE_string("output", None, "Also write the JSON metrics to this file.")
    from uecjax.parallel import launch

    launch.define_flags()


if __name__ == "__main__":
    from absl import app

    from uecjax import cli

    _define_flags()
    app.run(main, flags_parser=cli.config_flags_parser())
