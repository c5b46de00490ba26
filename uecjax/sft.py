"""Supervised warm-up: teacher-forced cross-entropy on (prompt, target) token pairs.

    stats = supervised_warmup(model, tokenizer, [(prompt_ids, target_ids), ...], steps=200,
                              batch_size=32, learning_rate=3e-3, seed=0)

The model is trained in place (`nnx.update`), so a `Sampler` built on it sees the new
weights. Shapes are fixed for the whole run (prompts left-padded, targets right-padded, in the
train step's layout), so the step compiles once; the loss is the token mean of -log p(target
token | prefix) at temperature 1, through `scoring.response_logprobs`. Targets should end with
the sampler's stop token. Used by the embedded tasks' policies (`uecjax.demo_model`,
`uecjax.countdown_model`); docs/DESIGN.md, "The embedded tasks and their warm-ups".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from uecjax.batch import positions_from_mask
from uecjax.optim import OptimConfig, make_optimizer
from uecjax.scoring import response_logprobs

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """Fixed-shape host arrays of one supervised batch."""

    tokens: np.ndarray  # [B, P + R] int32: left-padded prompt | right-padded target
    attention_mask: np.ndarray  # [B, P + R] int32, 1 on real prompt and target tokens
    positions: np.ndarray  # [B, P + R] int32, counting real tokens from 0
    loss_mask: np.ndarray  # [B, R] float32, 1 on target tokens


def make_sft_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], prompt_len: int,
                   target_len: int, pad_id: int = 0) -> SFTBatch:
    """Packs (prompt_ids, target_ids) pairs: prompts left-padded to `prompt_len`, targets
    right-padded to `target_len`. Raises ValueError when one does not fit."""
    B = len(examples)
    tokens = np.full((B, prompt_len + target_len), pad_id, np.int32)
    mask = np.zeros((B, prompt_len + target_len), np.int32)
    for i, (prompt, target) in enumerate(examples):
        if not 1 <= len(prompt) <= prompt_len or not 1 <= len(target) <= target_len:
            raise ValueError(f"example {i}: prompt of {len(prompt)} and target of {len(target)} "
                             f"tokens; need 1..{prompt_len} and 1..{target_len}")
        tokens[i, prompt_len - len(prompt):prompt_len] = prompt
        mask[i, prompt_len - len(prompt):prompt_len] = 1
        tokens[i, prompt_len:prompt_len + len(target)] = target
        mask[i, prompt_len:prompt_len + len(target)] = 1
    return SFTBatch(tokens=tokens, attention_mask=mask, positions=positions_from_mask(mask),
                    loss_mask=mask[:, prompt_len:].astype(np.float32))


def sft_loss(params, tokens, attention_mask, positions, loss_mask, *, graphdef,
             chunk_size: int = 1024):
    """(mean cross-entropy over the target tokens, number of target tokens)."""
    logp, _ = response_logprobs(graphdef, params, tokens, attention_mask, positions,
                                loss_mask.shape[1], chunk_size)
    count = jnp.sum(loss_mask)
    return -jnp.sum(logp * loss_mask) / jnp.maximum(count, 1.0), count


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "chunk_size"))
def sft_step(params, opt_state, tokens, attention_mask, positions, loss_mask, *, graphdef,
             optimizer: optax.GradientTransformation, chunk_size: int = 1024):
    """One optimizer step on the masked mean token cross-entropy of the target tokens.

    Pure: returns (new params, new optimizer state, metrics) with metrics = loss (before the
    update), grad_norm, tokens. `graphdef` and `optimizer` are static (hashable); the same
    objects reuse the compiled step.
    """
    (loss, count), grads = jax.value_and_grad(sft_loss, has_aux=True)(
        params, tokens, attention_mask, positions, loss_mask, graphdef=graphdef,
        chunk_size=chunk_size)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                               "tokens": count}


def supervised_warmup(model, tokenizer, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                      *, steps: int, batch_size: int, learning_rate: float, seed: int = 0,
                      log_every: int = 50, target_accuracy: float | None = None,
                      eval_fn: Callable[[], float] | None = None, eval_every: int | None = None,
                      warmup_steps: int | None = None, weight_decay: float = 0.01,
                      max_grad_norm: float = 1.0, end_lr_ratio: float = 0.1,
                      prompt_len: int | None = None, target_len: int | None = None,
                      log: Callable[[str], None] | None = None) -> dict:
    """Trains `model` in place on teacher-forced (prompt_ids, target_ids) pairs.

    AdamW (weight decay on matrices, global-norm clipping) with linear warmup
    (`warmup_steps`, default 5% of `steps`) and cosine decay to `end_lr_ratio` of the peak.
    Each epoch visits the examples in a fresh seeded order, `batch_size` per step (the last
    partial batch of an epoch is filled from the next epoch's order). Every `eval_every` steps
    (default `log_every`) and at the end, `eval_fn()` (if given) is called on the updated model;
    with `target_accuracy` set, training stops as soon as it returns >= target_accuracy.
    `log` (default: logger.info) gets a line every `log_every` steps.

    Returns stats: steps (taken), loss (mean over the last log window), first_loss,
    final_eval (last eval_fn value or None), evals [(step, value)], stopped_early,
    seconds, examples_seen.
    """
    if steps < 0 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, learning_rate={learning_rate}: "
                         "need steps >= 0, batch_size >= 1, learning_rate > 0")
    if not examples:
        raise ValueError("supervised_warmup: no examples")
    log = log or logger.info
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    prompt_len = prompt_len or max(len(p) for p, _ in examples)
    target_len = target_len or max(len(t) for _, t in examples)
    eval_every = eval_every or log_every
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    start = time.perf_counter()
    stats = {"steps": 0, "loss": float("nan"), "first_loss": float("nan"), "final_eval": None,
             "evals": [], "stopped_early": False, "seconds": 0.0, "examples_seen": 0}

    def evaluate(step: int) -> bool:
        if eval_fn is None:
            return False
        value = float(eval_fn())
        stats["evals"].append((step, value))
        stats["final_eval"] = value
        log(f"sft step {step}: eval {value:.3f}")
        return target_accuracy is not None and value >= target_accuracy

    if target_accuracy is not None and evaluate(0):  # already good enough
        stats["stopped_early"] = True
        stats["seconds"] = time.perf_counter() - start
        return stats
    if steps == 0:
        return stats

    if steps > warmup:
        schedule = dict(schedule="warmup_cosine", warmup_steps=warmup, total_steps=steps)
    else:  # too short to decay
        schedule = dict(schedule="constant")
    optimizer = make_optimizer(OptimConfig(
        learning_rate=learning_rate, end_lr_ratio=end_lr_ratio, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, **schedule))
    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    window: list = []
    for step in range(1, steps + 1):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(examples)).tolist())
        picked, order = order[:batch_size], order[batch_size:]
        b = make_sft_batch([examples[i] for i in picked], prompt_len, target_len, pad_id)
        params, opt_state, metrics = sft_step(params, opt_state, b.tokens, b.attention_mask,
                                              b.positions, b.loss_mask, graphdef=graphdef,
                                              optimizer=optimizer)
        window.append(metrics["loss"])
        stats["steps"] = step
        stats["examples_seen"] += batch_size
        if step == 1:
            stats["first_loss"] = float(metrics["loss"])
        if step % log_every == 0 or step == steps:
            stats["loss"] = float(np.mean(jax.device_get(window)))
            window = []
            log(f"sft step {step}/{steps}: loss {stats['loss']:.4f} "
                f"({time.perf_counter() - start:.1f}s)")
        if eval_fn is not None and (step % eval_every == 0 or step == steps):
            nnx.update(model, params)
            if evaluate(step):
                stats["stopped_early"] = step < steps
                break
    if window:
        stats["loss"] = float(np.mean(jax.device_get(window)))
    nnx.update(model, params)
    stats["seconds"] = time.perf_counter() - start
    if not math.isfinite(stats["loss"]):
        raise FloatingPointError(f"supervised warm-up diverged: loss {stats['loss']}")
    return stats
