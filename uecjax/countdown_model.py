"""The countdown task's initial policy: a tiny Qwen2 warmed up on diverse attempts.

    model, tokenizer, path = prepare_countdown_policy(workdir, seed=0)

builds the character-level tokenizer and a tiny tied-embedding Qwen2 (`COUNTDOWN_MODEL`,
0.08M parameters) and trains it with the supervised warm-up (`uecjax.sft`) on countdown train
problems: the prompt is the problem as is, the target the bare expression, then `<|im_end|>`
(`3 5 7 to 22:` -> `7+3*5<|im_end|>`). Each target is, with probability `correct_fraction`, a
correct solution, else a uniformly random attempt, and correct targets are shown on
`correct_levels` (level 1) only: the policy leaves diverse, not skilled, and RL has to find
the rare correct strings of level 2. Saved to WORKDIR/countdown_init and reused while its
settings match (`uecjax.demo_model.cached_policy`). Why, and measured figures: docs/DESIGN.md,
"The embedded tasks and their warm-ups".
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from typing import Callable, Sequence

from uecjax import sft
from uecjax.data.countdown import countdown_records, grade_countdown, random_attempt, solutions
from uecjax.demo_model import (PolicySettings, cached_policy, num_parameters, tiny_model_fields,
                               tiny_qwen2)
from uecjax.sampler import Sampler, SamplingParams
from uecjax.tokenizer import decode_responses, render_prompt, stop_token_ids

logger = logging.getLogger(__name__)

SETTINGS_FILE = "countdown_settings.json"
SETTINGS_VERSION = 1  # bump when the preparation itself changes
# The tiny model (TextConfig fields); vocab_size comes from the tokenizer.
COUNTDOWN_MODEL = tiny_model_fields(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    max_position_embeddings=128)


@dataclasses.dataclass(frozen=True)
class CountdownPolicySettings(PolicySettings):
    """Everything the prepared policy depends on (saved as countdown_settings.json)."""

    seed: int = 0
    model: tuple = tuple(sorted(COUNTDOWN_MODEL.items()))
    levels: tuple[int, ...] = (1, 2)
    num_train: int = 1000
    samples_per_problem: int = 4
    correct_fraction: float = 0.4
    correct_levels: tuple[int, ...] = (1,)
    template: str = "plain"
    use_chat_template: bool = False
    sft_steps: int = 1000
    batch_size: int = 64
    learning_rate: float = 3e-3
    num_val: int = 64
    version: int = SETTINGS_VERSION


def warmup_target(record, rng: random.Random, correct_fraction: float) -> str:
    """One warm-up target for a countdown record: with probability `correct_fraction` a correct
    solution drawn uniformly, else a `random_attempt` (which may be correct by chance)."""
    numbers, target = record.meta["numbers"], record.meta["target"]
    if correct_fraction > 0 and rng.random() < correct_fraction:
        return rng.choice(solutions(numbers, target))
    return random_attempt(numbers, rng)


def warmup_examples(tokenizer, records, *, correct_fraction: float, samples_per_problem: int,
                    seed: int, correct_levels: Sequence[int] = (1,), template: str = "plain",
                    use_chat_template: bool = False):
    """(prompt_ids, target_ids) pairs: `samples_per_problem` independent targets per record
    (`warmup_target`, with `correct_fraction` for records of `correct_levels`, else 0: random
    attempts only), each the expression then `<|im_end|>`."""
    if not 0.0 <= correct_fraction <= 1.0:
        raise ValueError(f"correct_fraction={correct_fraction}: must be in [0, 1]")
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem={samples_per_problem}: must be >= 1")
    end = stop_token_ids(tokenizer)[0]  # <|im_end|>
    rng = random.Random(seed)
    examples = []
    for r in records:
        prompt = render_prompt(tokenizer, r.prompt, template=template,
                               use_chat_template=use_chat_template)
        fraction = correct_fraction if r.meta["level"] in correct_levels else 0.0
        for _ in range(samples_per_problem):
            target = warmup_target(r, rng, fraction)
            examples.append((prompt, tokenizer.encode(target, add_special_tokens=False) + [end]))
    return examples


def policy_accuracy(model, tokenizer, records, *, template: str = "plain",
                    use_chat_template: bool = False, max_new_tokens: int = 16, n: int = 1,
                    temperature: float = 0.0, seed: int = 0, sampler=None) -> dict:
    """{"accuracy", "format", "numbers"}: means over `records` x `n` responses (temperature 0:
    greedy) of the countdown accuracy, of well-formed expressions, and of well-formed ones with
    exactly the problem's numbers (right or wrong value). A cheap in-process check; the
    reported evaluation uses `uecjax.evaluate`."""

    sampler = sampler or Sampler(model, pad_id=tokenizer.pad_token_id)
    stops = stop_token_ids(tokenizer)
    prompts = [render_prompt(tokenizer, r.prompt, template=template,
                             use_chat_template=use_chat_template) for r in records]
    out = sampler(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                          n=n, seed=seed, stop_token_ids=stops))
    texts = decode_responses(tokenizer, out.response_tokens, out.response_mask, stops)
    grades = [grade_countdown(t, r.meta["numbers"], r.meta["target"])
              for t, r in zip(texts, [r for r in records for _ in range(n)])]
    return {"accuracy": sum(g.accuracy for g in grades) / len(grades),
            "format": sum(g.format for g in grades) / len(grades),
            "numbers": sum(g.status in ("ok", "wrong_value") for g in grades) / len(grades)}


def prepare_countdown_policy(workdir: str, *, seed: int = 0, model_overrides: dict | None = None,
                             levels: Sequence[int] = (1, 2), num_train: int = 1000,
                             samples_per_problem: int = 4, correct_fraction: float = 0.4,
                             correct_levels: Sequence[int] = (1,), template: str = "plain", use_chat_template: bool = False,
                             sft_steps: int = 1000, batch_size: int = 64,
                             learning_rate: float = 3e-3, num_val: int = 64,
                             force: bool = False, log: Callable[[str], None] | None = None):
    """(model, tokenizer, path) of the countdown task's initial policy, trained or reused.

    workdir: the run directory; the policy lives in workdir/countdown_init.
    model_overrides: TextConfig fields replacing `COUNTDOWN_MODEL`'s.
    levels / num_train: the warm-up problems, `countdown_records("train", num_train,
      seed=seed, levels=levels)`; the test split is never looked at. The prompt settings
      (template, use_chat_template) must match the RL run's.
    samples_per_problem / correct_fraction / correct_levels: targets per problem
      (`warmup_examples`): on `correct_levels` a `correct_fraction` of them are correct, on
      the other levels all are random attempts (why level 2 is left out: docs/DESIGN.md,
      "Countdown").
    sft_steps / batch_size / learning_rate: the warm-up (`uecjax.sft.supervised_warmup`).
    num_val: other train-split problems, kept out of the warm-up set: the greedy accuracy and,
      over 4 samples per problem at temperature 1, the accuracy, the well-formed rate and the
      rate of well-formed responses with the problem's numbers on them are logged and saved
      (0: no check).
    force: retrain even if a matching policy exists.
    """
    log = log or logger.info
    fields = {**COUNTDOWN_MODEL, **(model_overrides or {})}
    settings = CountdownPolicySettings(
        seed=seed, model=tuple(sorted(fields.items())), levels=tuple(levels),
        num_train=num_train, samples_per_problem=samples_per_problem,
        correct_fraction=correct_fraction, correct_levels=tuple(correct_levels), template=template,
        use_chat_template=use_chat_template, sft_steps=sft_steps, batch_size=batch_size,
        learning_rate=learning_rate, num_val=num_val)

    def build():
        model, tokenizer = tiny_qwen2(fields, seed)
        val = countdown_records("train", num_val, seed=seed + 7919,
                                levels=tuple(levels)) if num_val else []
        held = {r.id for r in val}
        train = [r for r in countdown_records("train", num_train + len(val), seed=seed,
                                              levels=tuple(levels))
                 if r.id not in held][:num_train]
        examples = warmup_examples(tokenizer, train, correct_fraction=correct_fraction,
                                   samples_per_problem=samples_per_problem, seed=seed,
                                   correct_levels=tuple(correct_levels), template=template, use_chat_template=use_chat_template)
        log(f"countdown policy: warming up a {num_parameters(model) / 1e6:.3f}M-parameter Qwen2 "
            f"on {len(examples)} targets for {len(train)} problems of levels {tuple(levels)} "
            f"({sft_steps} steps of {batch_size}, {correct_fraction:.0%} correct targets on "
            f"levels {tuple(correct_levels)})")
        stats = sft.supervised_warmup(model, tokenizer, examples, steps=sft_steps,
                                  batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                  log_every=100, log=log)
        info = {"sft_loss": stats["loss"], "sft_steps_taken": stats["steps"],
                "sft_seconds": stats["seconds"], "val_accuracy": None}
        if val:
            sampler = Sampler(model, pad_id=tokenizer.pad_token_id)
            common = dict(template=template, use_chat_template=use_chat_template,
                          sampler=sampler, max_new_tokens=max(len(t) for _, t in examples) + 4)
            greedy = policy_accuracy(model, tokenizer, val, **common)
            sampled = policy_accuracy(model, tokenizer, val, n=4, temperature=1.0, seed=seed,
                                      **common)
            info.update(val_accuracy=greedy["accuracy"], val_sampled_accuracy=sampled["accuracy"],
                        val_sampled_format=sampled["format"],
                        val_sampled_numbers=sampled["numbers"])
            log(f"countdown policy: val greedy accuracy {greedy['accuracy']:.3f}, sampled "
                f"{sampled['accuracy']:.3f} (well-formed {sampled['format']:.3f}, with the "
                f"problem's numbers {sampled['numbers']:.3f})")
        return model, tokenizer, info

    return cached_policy(os.path.join(workdir, "countdown_init"), settings.to_json(), build,
                         settings_file=SETTINGS_FILE, force=force, log=log,
                         name="countdown policy")
