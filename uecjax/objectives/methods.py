"""RL methods as presets over one loss (ALGORITHMS.md sections 4, 6, 7, 9).

A method is a function `(LossInputs, LossConfig) -> (loss parts, stats)` plus a registry entry
(`METHODS`): its preset hyperparameters and, for clip_cov / kl_cov, a token selection over the
whole global batch made before the micro-batch loop. The UEC components of section 6 are
`LossConfig` switches (`explore`, `stabilizer`) that `loss_terms` adds to any method; `uec` is
GRPO with both on, and every ablation is one override away:

    loss_cfg = loss_config("uec", gate="hard", stabilizer=False)

Loss parts are normalised by the global counts in `LossInputs` and stats are masked sums, so
micro-batches sum to the global batch exactly (docs/DESIGN.md, "The train step").
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from uecjax.objectives.advantages import entropy_advantage
from uecjax.objectives.aggregation import aggregate
from uecjax.objectives.cov import clip_cov as clip_cov_mask
from uecjax.objectives.cov import kl_cov_mask
from uecjax.objectives.entropy_control import aer_allocation, exploration_loss, gate_weight
from uecjax.objectives.loss_config import LossConfig, LossConfigError
from uecjax.objectives.policy_loss import abs_zero_grad, gspo_clip_loss, kl_penalty, ppo_clip_loss

Terms = tuple[dict[str, jax.Array], dict[str, jax.Array]]


class LossInputs(NamedTuple):
    """One micro-batch as a method sees it: per-token [b, R], per-sequence [b], scalars."""

    logp: jax.Array  # log pi_theta of the response tokens (differentiable)
    entropy: jax.Array  # H under pi_theta (differentiable)
    old_logp: jax.Array  # log pi_old
    ref_logp: jax.Array | None  # log pi_ref; None when beta == 0
    adv: jax.Array  # token advantages A_{i,t}, 0 off the mask
    mask: jax.Array  # response mask, float32
    success_rate: jax.Array  # p_q of each sequence's prompt (higher = easier)
    hard: jax.Array  # 1.0 where the prompt is hard (section 5)
    select: jax.Array | None  # the method's token selection over the global batch, or None
    num_tokens: jax.Array  # valid tokens of the global batch
    num_seqs: jax.Array  # non-empty sequences of the global batch
    max_len: int  # static divisor of seq-mean-token-sum-norm
    h0: jax.Array  # initial entropy H_0 (section 6)
    h_anchor: jax.Array  # global token-mean entropy at which the stabilizer is linearised
    aer_alpha: jax.Array  # AER's current global coefficient (section 9)
    # weights of the per-token clipped policy loss only (e.g. the truncated importance weight
    # of section-8 exploration rows, LossConfig.explore_is_cap); None = 1
    token_weight: jax.Array | None = None


def agg(x: LossInputs, loss_cfg: LossConfig, values) -> jax.Array:
    """`aggregate` with the global batch's counts: micro-batch aggregates sum to the global one."""
    return aggregate(values, x.mask, loss_cfg.agg, global_token_count=x.num_tokens,
                     global_seq_count=x.num_seqs, max_len=x.max_len)


def token_sum(x: LossInputs, values) -> jax.Array:
    return jnp.sum(jnp.where(x.mask > 0, values, 0.0))


# ---- building blocks ----

def policy_terms(x: LossInputs, loss_cfg: LossConfig, *, adv=None, grad_mask=None, extra=None) -> Terms:
    """Clipped policy loss and KL to the reference (sections 4, 4a).

    The ratio is per token, or per sequence (GSPO) as `loss_cfg.ratio_level` says. adv overrides the
    token advantages (entropy_adv); x.token_weight multiplies the per-token clipped loss;
    grad_mask [b, R] in {0, 1} stops the gradient of the per-token policy loss where it is 0,
    keeping its value (clip_cov); extra [b, R] is added to the per-token loss (kl_cov).
    """
    adv = x.adv if adv is None else adv
    seq_stats = {}
    if loss_cfg.ratio_level == "token":
        loss, ind = ppo_clip_loss(x.logp, x.old_logp, adv, eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high,
                                  dual_clip=loss_cfg.dual_clip)
    else:
        loss, ind, seq = gspo_clip_loss(x.logp, x.old_logp, adv, x.mask, eps_low=loss_cfg.eps_low,
                                        eps_high=loss_cfg.eps_high, token_grad=loss_cfg.ratio_level == "sequence_token")
        low, high = seq["seq_clip_low"] * seq["seq_valid"], seq["seq_clip_high"] * seq["seq_valid"]
        seq_stats = {"seq_clip_frac": jnp.sum(low + high), "seq_clip_frac_low": jnp.sum(low),
                     "seq_clip_frac_high": jnp.sum(high)}
    if x.token_weight is not None:
        loss = loss * x.token_weight.astype(jnp.float32)
    if grad_mask is not None:
        loss = jnp.where(grad_mask > 0, loss, jax.lax.stop_gradient(loss))
    if extra is not None:
        loss = loss + extra
    parts = {"pg": agg(x, loss_cfg, loss)}
    if loss_cfg.beta > 0:
        if x.ref_logp is None:
            raise LossConfigError(f"beta={loss_cfg.beta} needs reference log-probs in the batch (ref_logp)")
        parts["kl"] = loss_cfg.beta * agg(x, loss_cfg, kl_penalty(x.logp, x.ref_logp, loss_cfg.kl_kind, loss_cfg.kl_clamp))
    names = {"clip_low": "clip_frac_low", "clip_high": "clip_frac_high", "dual_clip": "clip_frac_dual"}
    stats = {names[k]: token_sum(x, v) for k, v in ind.items()}
    return parts, {**stats, **seq_stats}


def entropy_bonus(x: LossInputs, loss_cfg: LossConfig, seq_weight, coef) -> jax.Array:
    """-coef * agg(w_q H): the entropy term of sections 6, 7 and 9, with the global counts."""
    return exploration_loss(x.entropy, x.mask, seq_weight, coef, loss_cfg.agg, global_token_count=x.num_tokens,
                            global_seq_count=x.num_seqs, max_len=x.max_len)


def uec_gate(success_rate, loss_cfg: LossConfig):
    """Exploration weight w_q of section 6 from the success rate."""
    return gate_weight(success_rate, loss_cfg.gate, loss_cfg.gate_tau, loss_cfg.gate_s)


def stabilizer_surrogate(x: LossInputs, loss_cfg: LossConfig) -> jax.Array:
    """Micro-batch share of the stabilizer lambda relu(Hbar - kappa H_0)^2 (section 6).

    The penalty is nonlinear in the global token-mean entropy Hbar, so a micro-batch cannot
    compute it; its gradient, 2 lambda relu(Hbar - H_max) dHbar, is linear in dHbar, and
    dHbar is the sum over micro-batches of d(sum_mb m H / N_global). With Hbar fixed at the
    anchor (x.h_anchor, no gradient) the surrogate below therefore sums to the exact gradient
    of the global penalty. Its value is not the penalty: the step reports the penalty itself.
    """
    h_max = loss_cfg.kappa * x.h0
    coef = 2.0 * loss_cfg.lam * jax.nn.relu(jax.lax.stop_gradient(x.h_anchor) - h_max)
    return coef * token_sum(x, x.entropy) / jnp.maximum(x.num_tokens, 1.0)


# ---- methods ----

def grpo(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """Sections 2-4 only (also `dapo` and `uec`, whose differences are presets and switches)."""
    return policy_terms(x, loss_cfg)


def entropy_reg(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """L_pg - c * agg(H) (section 7)."""
    parts, stats = policy_terms(x, loss_cfg)
    parts["entropy"] = entropy_bonus(x, loss_cfg, jnp.ones_like(x.success_rate), loss_cfg.entropy_coef)
    return parts, stats


def clip_cov(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """Policy loss with the gradient of the selected high-covariance tokens dropped (section 7)."""
    parts, stats = policy_terms(x, loss_cfg, grad_mask=x.select)
    stats["cov_selected"] = token_sum(x, 1.0 - x.select)
    return parts, stats


def kl_cov(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """Policy loss plus k |log pi - log pi_old| on the top-Cov tokens (section 7)."""
    extra = loss_cfg.kl_cov_coef * abs_zero_grad(x.logp - x.old_logp) * x.select
    parts, stats = policy_terms(x, loss_cfg, extra=extra)
    stats["cov_selected"] = token_sum(x, x.select)
    return parts, stats


def entropy_adv(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """A_{i,t} += min(a stopgrad(H_{i,t}), |A_{i,t}| / k), arXiv 2506.14758 (section 7)."""
    adv = entropy_advantage(x.adv, x.entropy, loss_cfg.entropy_adv_a, loss_cfg.entropy_adv_k) * x.mask
    return policy_terms(x, loss_cfg, adv=adv)


def aer(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """L_pg - alpha_k * agg(lambda_q H), alpha_k from the controller state (section 9)."""
    parts, stats = policy_terms(x, loss_cfg)
    weight = aer_allocation(x.success_rate, loss_cfg.aer_alloc, loss_cfg.aer_tau)
    parts["aer"] = entropy_bonus(x, loss_cfg, weight, x.aer_alpha)
    stats["aer_alloc_frac"] = token_sum(x, jnp.broadcast_to(weight[:, None], x.mask.shape))
    return parts, stats


# ---- token selections over the global batch (static shapes) ----

def select_clip_cov(old_logp, adv, mask, key, loss_cfg: LossConfig):
    """1 everywhere except the randomly dropped tokens with Cov in (lo, hi)."""
    return clip_cov_mask(old_logp, adv, mask, key, frac=loss_cfg.cov_frac, clip_lo=loss_cfg.clip_cov_lo,
                         clip_hi=loss_cfg.clip_cov_hi)


def select_kl_cov(old_logp, adv, mask, key, loss_cfg: LossConfig):
    """1 on the top cov_frac of valid tokens by Cov."""
    del key
    return kl_cov_mask(old_logp, adv, mask, frac=loss_cfg.cov_frac)


# ---- registry ----

@dataclasses.dataclass(frozen=True)
class Method:
    loss: Callable[[LossInputs, LossConfig], Terms]
    preset: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    # (old_logp, adv, mask, key, loss_cfg) -> [B, R] float32 over the global batch, or None. The
    # selection uses log pi_old, which equals log pi at the first update on a batch; that is
    # what lets it be made once over the global batch without an extra forward pass.
    select: Callable | None = None


def _preset(**values):
    return types.MappingProxyType(values)


METHODS: Mapping[str, Method] = types.MappingProxyType({
    "grpo": Method(grpo),
    "dapo": Method(grpo, _preset(eps_high=0.28, beta=0.0, agg="token-mean", overlong_buffer=0.2,
                                 dynamic_sampling=True)),
    "entropy_reg": Method(entropy_reg),
    "clip_cov": Method(clip_cov, select=select_clip_cov),
    "kl_cov": Method(kl_cov, select=select_kl_cov),
    "entropy_adv": Method(entropy_adv),
    "aer": Method(aer),
    # GSPO (arXiv 2507.18071, section 4a): the paper's and verl's recipe values
    "gspo": Method(grpo, _preset(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4,
                                 agg="seq-mean-token-mean", beta=0.0)),
    "uec": Method(grpo, _preset(explore=True, stabilizer=True)),
    # The authors' released code: section 8's rollout-level exploration and replay over the
    # plain GRPO loss (the rollout switches are uecjax.rollout.ROLLOUT_PRESETS["uec_code"]).
    "uec_code": Method(grpo),
})


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LossConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def loss_config(method: str = "grpo", **overrides) -> LossConfig:
    """The method's preset, then `overrides`, on top of the LossConfig defaults."""
    preset = get_method(method).preset
    fields = {f.name for f in dataclasses.fields(LossConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise LossConfigError(f"unknown LossConfig field(s) {unknown}; fields: {sorted(fields)}")
    return LossConfig(method=method, **{**preset, **overrides})


def loss_terms(x: LossInputs, loss_cfg: LossConfig) -> Terms:
    """The method's terms plus the section-6 components switched on in `loss_cfg`."""
    parts, stats = get_method(loss_cfg.method).loss(x, loss_cfg)
    if loss_cfg.explore:
        parts["explore"] = entropy_bonus(x, loss_cfg, uec_gate(x.success_rate, loss_cfg), loss_cfg.alpha)
    if loss_cfg.stabilizer:
        parts["stab"] = stabilizer_surrogate(x, loss_cfg)
    return parts, stats
