r"""Evaluation: greedy Pass@1 and sampled Pass@k on held-out problems (ALGORITHMS.md section 10).

    metrics = evaluate(Sampler(model, pad_id=tok.pad_token_id), tok, records, grader,
                       n=8, max_new_tokens=64)
    # {"greedy_pass@1", "pass@1", "pass@2", ... "pass@n", "accuracy", "reward", "format",
    #  "response_length", "truncated", greedy_* of the same, "num_prompts", "n", ...}

Every prompt gets one greedy response and `n` sampled ones, graded by the reward function;
pass@k is the unbiased 1 - C(n - c, k) / C(n, k) averaged over prompts (pass@1 = the mean
sampled accuracy). The training loop's periodic evaluation calls this; so does the command
line, `python -m uecjax.evaluate` (`uecjax.evaluate_cli`), on an exported checkpoint.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from uecjax.config import base_config
from uecjax.metrics import pass_at_k_table
from uecjax.parallel.hosts import Hosts
from uecjax.rewards.grader import RewardGrader
from uecjax.sampler import SamplingParams
from uecjax.tokenizer import decode_responses, stop_token_ids
from uecjax.vision_inputs import ImageError, render_record

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


_DEFAULTS = base_config()  # the keyword defaults are the config's


def evaluate(sampler, tokenizer, records, grader, *, n: int = _DEFAULTS.eval.n,
             max_new_tokens: int, temperature: float = _DEFAULTS.eval.temperature,
             top_p: float = _DEFAULTS.eval.top_p, batch_prompts: int = _DEFAULTS.eval.batch_prompts,
             prompt_template: str = _DEFAULTS.prompt.template,
             use_chat_template: bool = _DEFAULTS.prompt.use_chat_template,
             seed: int = _DEFAULTS.seed, ks: Sequence[int] | None = None, progress: bool = True,
             greedy: bool = True, image_processor=None, hosts: Hosts = Hosts()) -> dict:
    """Greedy Pass@1 and sampled Pass@k of `sampler`'s model on `records` (module docstring).

    sampler: a `uecjax.sampler.Sampler` (reads the model's current parameters at each call).
    records: objects with `.prompt`, `.answer` and optional `.choices` (`uecjax.data.Record`).
    grader: a `uecjax.rewards.grader.RewardGrader` (anything with `grade_batch(responses, answers,
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


if __name__ == "__main__":  # `python -m uecjax.evaluate`: the command line (uecjax.evaluate_cli)
    from uecjax.evaluate_cli import run

    run()
