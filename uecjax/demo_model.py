r"""The embedded demo's initial policy: a tiny Qwen2 from scratch, warmed up on worked solutions.

    model, tokenizer, path = prepare_demo_policy(workdir, seed=0)

builds the character-level tokenizer and a tiny tied-embedding Qwen2 (`DEMO_MODEL`, 0.61M
parameters) and trains it with the supervised warm-up (`uecjax.sft`) on demo train problems
with short worked solutions (`demo_solution`): `3 * 4 - 5 = ?` ->
`<think>3*4=12 12-5=7</think>\boxed{7}<|im_end|>`. The warm-up is deliberately short and
skips level 3 (`WARMUP_LEVELS`), so RL starts from a partial success rate; `slip` makes that
fraction of the teacher's boxed answers off by 1-2. The result is saved to WORKDIR/demo_init
with the settings that made it and reused while they match (`cached_policy`, also the
countdown policy's). Measured figures: docs/DESIGN.md, "The embedded tasks and their warm-ups".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from typing import Callable, Sequence

import jax
from flax import nnx

from uecjax import sft
from uecjax.data.demo import demo_records
from uecjax.models import Qwen2, TextConfig, from_pretrained, save_pretrained
from uecjax.rewards.grading import extract_boxed
from uecjax.sampler import Sampler, SamplingParams
from uecjax.tokenizer import (char_tokenizer, decode_responses, load_tokenizer, render_prompt,
                              stop_token_ids)

logger = logging.getLogger(__name__)


def tiny_model_fields(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                      max_position_embeddings: int) -> dict:
    """The TextConfig fields (but vocab_size, which comes from the tokenizer) of a
    self-prepared policy's tiny Qwen2 (the demo's, the countdown task's): 4 heads / 2 KV heads,
    RoPE theta 1e4, tied embeddings, and this width, depth and context."""
    return dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=max_position_embeddings, rope_theta=10000.0,
                tie_word_embeddings=True)


class PolicySettings:
    """Base of the settings dataclasses of the self-prepared policies (saved as JSON)."""

    def to_json(self) -> dict:
        """The fields as JSON values: `model` (sorted (field, value) pairs) as a dict, the other
        tuples as lists."""
        return {k: dict(v) if k == "model" else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


SETTINGS_FILE = "demo_settings.json"
SETTINGS_VERSION = 1  # bump when the preparation itself changes
# The tiny model (TextConfig fields); vocab_size comes from the tokenizer.
DEMO_MODEL = tiny_model_fields(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                               max_position_embeddings=512)
# Levels of the warm-up problems. Level 3 (two-digit +-) is left out so that it starts hard.
WARMUP_LEVELS = (1, 2, 4)


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"operator {op!r}")


def demo_solution(record, *, answer_offset: int = 0) -> str:
    r"""A short worked solution of a demo record: `<think>STEPS</think>\boxed{ANSWER}`.

    STEPS evaluates `record.meta["expression"]` (`a op b op c`, ops + - *, left to right,
    which is also the precedence order the demo generates) one operation at a time:
    `3 * 4 - 5` -> `3*4=12 12-5=7`. Raises ValueError when the expression does not evaluate
    to `record.answer`. `answer_offset` is added to the boxed answer only (a careless
    teacher's slip: the steps stay right, the copied result is wrong).
    """
    parts = str(record.meta["expression"]).split()
    if len(parts) % 2 == 0 or not all(p.isdigit() for p in parts[::2]):
        raise ValueError(f"demo expression {record.meta['expression']!r}: expected `a op b ...`")
    value = int(parts[0])
    steps = []
    for op, operand in zip(parts[1::2], parts[2::2]):
        new = _apply(value, op, int(operand))
        steps.append(f"{value}{op}{operand}={new}")
        value = new
    if str(value) != str(record.answer).strip():
        raise ValueError(f"demo expression {record.meta['expression']!r} = {value}, "
                         f"but the record's answer is {record.answer!r}")
    return "<think>" + " ".join(steps) + "</think>\\boxed{" + str(value + answer_offset) + "}"


@dataclasses.dataclass(frozen=True)
class DemoPolicySettings(PolicySettings):
    """Everything the prepared policy depends on (saved as demo_settings.json)."""

    seed: int = 0
    model: tuple = tuple(sorted(DEMO_MODEL.items()))
    levels: tuple[int, ...] = WARMUP_LEVELS
    num_train: int = 2000
    style: str = "expression"
    template: str = "plain"
    use_chat_template: bool = True
    sft_steps: int = 500
    batch_size: int = 32
    learning_rate: float = 3e-3
    target_accuracy: float | None = None
    num_val: int = 64
    slip: float = 0.0
    version: int = SETTINGS_VERSION


def slip_offsets(n: int, slip: float, answers: Sequence[int], seed: int) -> list[int]:
    """The careless teacher's slips: 0 for most solutions, else one of -2, -1, 1, 2 (kept >= 0).

    With probability `slip` a solution's boxed answer is off by a small amount. The warmed-up
    policy then knows the arithmetic but copies its result into the box only part of the
    time, which is what RL on a verifiable reward can fix in minutes: greedy decoding mostly
    copies (the mode), sampling slips, so sampled Pass@1 starts well below Pass@k.
    """
    rng = random.Random(seed)
    offsets = []
    for answer in answers[:n]:
        if rng.random() >= slip:
            offsets.append(0)
            continue
        choices = [d for d in (-2, -1, 1, 2) if answer + d >= 0]
        offsets.append(rng.choice(choices))
    return offsets


def _build_examples(tokenizer, records, template: str, use_chat_template: bool,
                    slip: float = 0.0, seed: int = 0):
    end = stop_token_ids(tokenizer)[0]  # <|im_end|>: the end of the assistant turn
    offsets = slip_offsets(len(records), slip, [int(r.answer) for r in records], seed)
    examples = []
    for r, offset in zip(records, offsets):
        prompt = render_prompt(tokenizer, r.prompt, template=template,
                               use_chat_template=use_chat_template)
        target = tokenizer.encode(demo_solution(r, answer_offset=offset),
                                  add_special_tokens=False) + [end]
        examples.append((prompt, target))
    return examples


def greedy_accuracy(model, tokenizer, records, *, template: str = "plain",
                    use_chat_template: bool = True, max_new_tokens: int = 48,
                    sampler=None) -> float:
    """Fraction of `records` whose greedy response's last \\boxed{} equals the answer exactly.

    A cheap in-process check for the demo's integer answers (no grader processes); the
    reported evaluation uses `uecjax.evaluate`.
    """

    sampler = sampler or Sampler(model, pad_id=tokenizer.pad_token_id)
    stops = stop_token_ids(tokenizer)
    prompts = [render_prompt(tokenizer, r.prompt, template=template,
                             use_chat_template=use_chat_template) for r in records]
    out = sampler(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                          stop_token_ids=stops))
    texts = decode_responses(tokenizer, out.response_tokens, out.response_mask, stops)
    return float(sum(extract_boxed(t) == str(r.answer) for t, r in zip(texts, records))
                 / len(records))


def _load(path: str):

    return from_pretrained(path), load_tokenizer(path)


def tiny_qwen2(model_fields: dict, seed: int):
    """(model, tokenizer): the character-level tokenizer and a fresh tiny Qwen2 over it, of the
    TextConfig fields `model_fields` (vocab_size comes from the tokenizer)."""
    tokenizer = char_tokenizer()
    config = TextConfig(vocab_size=len(tokenizer), **model_fields)
    return Qwen2(config, rngs=nnx.Rngs(seed)), tokenizer


def num_parameters(model) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model)))


def cached_policy(path: str, settings: dict, build: Callable[[], tuple], *, settings_file: str,
                  force: bool, log: Callable[[str], None], name: str):
    """(model, tokenizer, path): the policy saved at `path` if its settings match, else built.

    A self-prepared policy (the demo's, the countdown task's) is saved in Hugging Face layout
    with a JSON `settings_file` written last, {"settings": settings, ...what build reported}:
    a later call with the same `settings` loads it instead of training again; other settings,
    a missing or partial directory, or `force` rebuild it. `build()` returns (model, tokenizer,
    info), info a JSON-able dict that may hold "val_accuracy" and "sft_loss" (logged).
    """

    settings_path = os.path.join(path, settings_file)
    if not force and os.path.exists(settings_path):
        try:
            with open(settings_path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            saved = None
        if saved is not None and saved.get("settings") == settings:
            model, tokenizer = _load(path)
            log(f"{name}: reusing {path} (greedy val accuracy {saved.get('val_accuracy')})")
            return model, tokenizer, path
        log(f"{name}: {path} was made with other settings; rebuilding it")
    start = time.perf_counter()
    model, tokenizer, info = build()
    save_pretrained(model, path)
    tokenizer.save_pretrained(path)
    record = {"settings": settings, **info, "seconds": time.perf_counter() - start}
    tmp = settings_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, settings_path)
    log(f"{name}: saved to {path} in {record['seconds']:.0f}s (loss "
        f"{info.get('sft_loss', float('nan')):.3f}, greedy val accuracy {info.get('val_accuracy')})")
    return model, tokenizer, path


def prepare_demo_policy(workdir: str, *, seed: int = 0, model_overrides: dict | None = None,
                        levels: Sequence[int] = WARMUP_LEVELS, num_train: int = 2000,
                        style: str = "expression", template: str = "plain",
                        use_chat_template: bool = True, sft_steps: int = 500,
                        batch_size: int = 32, learning_rate: float = 3e-3,
                        target_accuracy: float | None = None, num_val: int = 64,
                        slip: float = 0.0, force: bool = False,
                        log: Callable[[str], None] | None = None):
    """(model, tokenizer, path) of the demo's initial policy, trained or reused.

    workdir: the run directory; the policy lives in workdir/demo_init (HF layout + tokenizer).
    model_overrides: TextConfig fields replacing `DEMO_MODEL`'s.
    levels / num_train / style: the warm-up problems, `demo_records("train", ...,
      seed=seed, levels=levels, style=style)` (num_train of them). style and the prompt
      settings (template, use_chat_template) must match the RL run's: the policy learns that
      prompt format.
    sft_steps / batch_size / learning_rate: the warm-up (`uecjax.sft.supervised_warmup`).
    num_val: train-split problems of all levels kept out of the warm-up set; the greedy
      accuracy on them is logged and saved (0: no check, a few seconds faster).
    slip: fraction of warm-up solutions whose boxed answer is off by 1-2 (`slip_offsets`).
    target_accuracy: stop the warm-up early once that accuracy reaches it (checked every 50
      steps; None: run all steps). The test split is never looked at.
    force: retrain even if a matching policy exists.
    """
    log = log or logger.info
    cfg_fields = {**DEMO_MODEL, **(model_overrides or {})}
    settings = DemoPolicySettings(
        seed=seed, model=tuple(sorted(cfg_fields.items())), levels=tuple(levels),
        num_train=num_train, style=style, template=template, use_chat_template=use_chat_template,
        sft_steps=sft_steps, batch_size=batch_size, learning_rate=learning_rate,
        target_accuracy=target_accuracy, num_val=num_val, slip=slip)

    def build():
        model, tokenizer = tiny_qwen2(cfg_fields, seed)
        # Validation: train-split problems of every level (never the test split, so the
        # held-out numbers stay clean), kept out of the warm-up set.
        val = demo_records("train", num_val, seed=seed + 7919, style=style) if num_val else []
        held = {r.prompt for r in val}
        train = [r for r in demo_records("train", num_train + len(val), seed=seed,
                                         levels=tuple(levels), style=style)
                 if r.prompt not in held][:num_train]
        examples = _build_examples(tokenizer, train, template, use_chat_template, slip, seed)
        sampler = Sampler(model, pad_id=tokenizer.pad_token_id)
        max_new = max(len(t) for _, t in examples) + 8

        def eval_fn():
            return greedy_accuracy(model, tokenizer, val, template=template,
                                   use_chat_template=use_chat_template,
                                   max_new_tokens=max_new, sampler=sampler)

        log(f"demo policy: warming up a {num_parameters(model) / 1e6:.2f}M-parameter Qwen2 on "
            f"{len(examples)} problems of levels {tuple(levels)} ({sft_steps} steps of "
            f"{batch_size})")
        stats = sft.supervised_warmup(
            model, tokenizer, examples, steps=sft_steps, batch_size=batch_size,
            learning_rate=learning_rate, seed=seed, log_every=50,
            target_accuracy=target_accuracy,
            eval_fn=eval_fn if target_accuracy is not None else None, eval_every=50, log=log)
        val_acc = stats["final_eval"] if stats["final_eval"] is not None else (
            eval_fn() if val else None)
        return model, tokenizer, {"val_accuracy": val_acc, "sft_loss": stats["loss"],
                                  "sft_steps_taken": stats["steps"]}

    return cached_policy(os.path.join(workdir, "demo_init"), settings.to_json(), build,
                         settings_file=SETTINGS_FILE, force=force, log=log, name="demo policy")
