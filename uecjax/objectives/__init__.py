"""Pure objective functions of the train step (ALGORITHMS.md sections 2-7, 9)."""

from uecjax.objectives.advantages import (
    broadcast_to_tokens,
    entropy_advantage,
    group_advantages,
    overlong_penalty,
)
from uecjax.objectives.aggregation import aggregate, batch_counts
from uecjax.objectives.cov import clip_cov, kl_cov, kl_cov_mask, token_cov
from uecjax.objectives.entropy_control import (
    aer_allocation,
    aer_target,
    aer_update,
    exploration_loss,
    gate_weight,
    is_hard,
    per_sequence,
    stabilizer_penalty,
    success_rate,
)
from uecjax.objectives.logprobs import naive_token_logprobs_and_entropy, token_logprobs_and_entropy
from uecjax.objectives.loss_config import LossConfig, LossConfigError
from uecjax.objectives.methods import METHODS, Method, get_method, loss_config
from uecjax.objectives.policy_loss import kl_penalty, ppo_clip_loss

__all__ = [
    "LossConfig",
    "LossConfigError",
    "METHODS",
    "Method",
    "aer_allocation",
    "aer_target",
    "aer_update",
    "aggregate",
    "batch_counts",
    "broadcast_to_tokens",
    "clip_cov",
    "entropy_advantage",
    "exploration_loss",
    "gate_weight",
    "get_method",
    "group_advantages",
    "is_hard",
    "kl_cov",
    "kl_cov_mask",
    "kl_penalty",
    "loss_config",
    "naive_token_logprobs_and_entropy",
    "overlong_penalty",
    "per_sequence",
    "ppo_clip_loss",
    "stabilizer_penalty",
    "success_rate",
    "token_cov",
    "token_logprobs_and_entropy",
]
