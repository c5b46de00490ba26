"""Per-group statistics of sampled responses, on the host (ALGORITHMS.md sections 2, 5, 7):
rewards with DAPO's overlong shaping, group advantages, each prompt's success rate, and
DAPO's informative groups. Rows are prompt-major, G consecutive responses per prompt."""

from __future__ import annotations

import dataclasses

import numpy as np

from uecjax.objectives.advantages import group_advantages, overlong_penalty
from uecjax.objectives.entropy_control import per_sequence, success_rate
from uecjax.objectives.loss_config import LossConfig


@dataclasses.dataclass(frozen=True)
class GroupStats:
    advantage: np.ndarray  # [n] float32, each response's advantage within its group
    prompt_success: np.ndarray  # [n / G] float32, p_q: the mean accuracy of each prompt's group
    success_rate: np.ndarray  # [n] float32, p_q of each response's prompt


def group_stats(rewards, accuracy, group_size: int, advantage: str = "grpo",
                prompt_success=None) -> GroupStats:
    """Advantages of `rewards` [n] within groups of `group_size` (section 2), and the success
    rate p_q from `accuracy` [n] (section 5), or `prompt_success` [n / G] where the prompts'
    rates were measured elsewhere (exploration groups keep their regular group's p_q)."""
    rewards = np.asarray(rewards, np.float32)
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} responses do not form groups of {group_size}")
    adv = np.asarray(group_advantages(rewards, group_size, advantage), np.float32)
    if prompt_success is None:
        prompt_success = success_rate(np.asarray(accuracy, np.float32).reshape(-1, group_size))
    prompt_success = np.asarray(prompt_success, np.float32)
    return GroupStats(adv, prompt_success, per_sequence(prompt_success, group_size))


def shaped_rewards(rewards, lengths, response_budget: int, loss_cfg: LossConfig) -> np.ndarray:
    """Rewards plus DAPO's soft overlong penalty on token length when overlong_buffer > 0."""
    rewards = np.asarray(rewards, np.float32)
    if loss_cfg.overlong_buffer <= 0:
        return rewards
    cache = max(1, int(round(loss_cfg.overlong_buffer * response_budget)))
    return rewards + np.asarray(overlong_penalty(lengths, response_budget, cache,
                                                 loss_cfg.overlong_factor))


def informative_groups(scores, group_size: int) -> np.ndarray:
    """DAPO dynamic sampling (section 7): True for the groups whose scores are not all equal."""
    r = np.asarray(scores, np.float32).reshape(-1, group_size)
    return r.max(axis=1) > r.min(axis=1)
