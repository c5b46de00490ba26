"""The train step's batch: fixed-shape arrays, and the host-side builder from sampler output.

Layout: row i is one sequence, `tokens = [prompt (P, left-padded) | response (R)]`, rows
prompt-major in groups of G (row q * G + j is response j of prompt q), as the sampler emits
them. Everything the step needs per sequence (advantage, difficulty, hard flag) is computed
here on the host (ALGORITHMS.md sections 2, 5, 7) and enters the step as arrays.

    batch = build_batch(sampler_out, rewards, acc, group_size=G, hp=hp)
    old_logp, old_entropy = trainer.compute_logprobs(params, batch)
    batch = batch.replace(old_logp=old_logp, old_entropy=old_entropy)   # + ref_logp if beta > 0
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from uecjax.objectives.advantages import group_advantages, overlong_penalty
from uecjax.objectives.entropy_control import per_sequence, success_rate
from uecjax.objectives.loss_config import LossConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    tokens: jax.Array  # [B, P + R] int32
    attention_mask: jax.Array  # [B, P + R] int32, 1 on real prompt and response tokens
    positions: jax.Array  # [B, P + R] int32 position ids (count real tokens from 0)
    response_mask: jax.Array  # [B, R] float32, 1 on response tokens that carry loss
    advantages: jax.Array  # [B] sequence advantages, or [B, R] per token
    difficulty: jax.Array  # [B] float32 success rate p_q of the sequence's prompt
    is_hard: jax.Array  # [B] float32, 1 where p_q <= tau_hard
    old_logp: jax.Array | None = None  # [B, R] log pi_old at temperature 1 (compute_logprobs)
    old_entropy: jax.Array | None = None  # [B, R] entropy under pi_old (same pass)
    ref_logp: jax.Array | None = None  # [B, R] log pi_ref; None when beta == 0
    sampler_logp: jax.Array | None = None  # [B, R] the sampler's own log-probs (parity metric)

    @property
    def response_len(self) -> int:
        return self.response_mask.shape[1]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.response_len

    def replace(self, **changes) -> "Batch":
        return dataclasses.replace(self, **changes)


def positions_from_mask(mask) -> np.ndarray:
    """Position ids counting real tokens from 0 (left padding), as uecjax.models.default_positions."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def informative_groups(rewards, group_size: int) -> np.ndarray:
    """DAPO dynamic sampling (section 7): True for the groups whose rewards are not all equal."""
    r = np.asarray(rewards, np.float32).reshape(-1, group_size)
    return r.max(axis=1) > r.min(axis=1)


def shaped_rewards(rewards, lengths, response_budget: int, hp: LossConfig) -> np.ndarray:
    """Rewards plus DAPO's soft overlong penalty on token length when hp.overlong_buffer > 0."""
    rewards = np.asarray(rewards, np.float32)
    if hp.overlong_buffer <= 0:
        return rewards
    cache = max(1, int(round(hp.overlong_buffer * response_budget)))
    return rewards + np.asarray(overlong_penalty(lengths, response_budget, cache, hp.overlong_factor))


def build_batch(out, rewards, acc, *, group_size: int, hp: LossConfig,
                response_budget: int | None = None) -> Batch:
    """A Batch (host numpy) from a `uecjax.sampler.SamplerOutput` and per-response rewards.

    rewards [N]: the scalar reward of each response (section 1); acc [N]: its accuracy
    component in {0, 1}, from which the difficulty is measured (section 5). N = prompts x G.
    response_budget: the generation limit for overlong shaping (default: the response width).
    The old / reference log-probs are left unset: fill them with the trainer's
    `compute_logprobs`.
    """
    n = out.response_tokens.shape[0]
    rewards, acc = np.asarray(rewards, np.float32), np.asarray(acc, np.float32)
    if rewards.shape != (n,) or acc.shape != (n,):
        raise ValueError(f"rewards {rewards.shape} and acc {acc.shape} must both be ({n},), one per response")
    if n % group_size:
        raise ValueError(f"{n} responses do not form groups of {group_size}")
    R = out.response_tokens.shape[1]
    rewards = shaped_rewards(rewards, out.response_mask.sum(axis=1), response_budget or R, hp)
    adv = np.asarray(group_advantages(rewards, group_size, hp.advantage), np.float32)
    difficulty = per_sequence(success_rate(acc.reshape(-1, group_size)), group_size)
    mask = np.concatenate([out.prompt_mask, out.response_mask], axis=1).astype(np.int32)
    return Batch(
        tokens=np.concatenate([out.prompt_tokens, out.response_tokens], axis=1).astype(np.int32),
        attention_mask=mask,
        positions=positions_from_mask(mask),
        response_mask=out.response_mask.astype(np.float32),
        advantages=adv,
        difficulty=difficulty,
        is_hard=(difficulty <= hp.tau_hard).astype(np.float32),
        sampler_logp=np.asarray(out.logprobs, np.float32),
    )
