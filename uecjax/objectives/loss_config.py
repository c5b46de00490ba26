"""Hyperparameters of the RL loss (ALGORITHMS.md sections 2-7, 9), validated on construction.

Build one with `uecjax.objectives.methods.loss_config(method, **overrides)`, which applies the
method's preset (e.g. `dapo`: eps_high 0.28, beta 0) before the overrides. The defaults here
are the spec's starting values for GRPO.
"""

from __future__ import annotations

import dataclasses

from uecjax.objectives.advantages import ADVANTAGE_KINDS
from uecjax.objectives.aggregation import AGG_MODES
from uecjax.objectives.entropy_control import GATE_KINDS
from uecjax.objectives.policy_loss import KL_KINDS, RATIO_LEVELS

STABILIZER_ANCHORS = ("old", "current")


class LossConfigError(ValueError):
    """A loss hyperparameter out of range; the message names the field and the valid values."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    method: str = "grpo"  # a key of uecjax.objectives.methods.METHODS
    # -- advantages (section 2), computed on the host --
    advantage: str = "grpo"  # grpo | drgrpo | rloo
    # -- policy loss, KL, aggregation (section 4) --
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 3.0  # c > 1; bounds the loss of A < 0 tokens at -c * A
    # importance ratio (section 4a): token (PPO), sequence (GSPO), sequence_token (GSPO-token)
    ratio_level: str = "token"
    agg: str = "token-mean"  # one of uecjax.objectives.aggregation.AGG_MODES
    agg_max_len: int | None = None  # seq-mean-token-sum-norm divisor; None: the response length
    beta: float = 0.01  # KL-to-reference coefficient; 0 skips the reference model entirely
    kl_kind: str = "k3"
    kl_clamp: float = 10.0
    # -- success rate and hard prompts (difficulty, section 5) --
    tau_hard: float = 0.0  # hard prompt: success rate p_q <= tau_hard
    # -- UEC-RL components (section 6); each on its own switch, any method can use them --
    explore: bool = False  # gated exploration term -alpha * agg(w_q H)
    alpha: float = 0.01
    gate: str = "linear"  # hard | linear | sigmoid
    gate_tau: float = 0.5
    gate_s: float = 0.1  # sigmoid temperature
    stabilizer: bool = False  # lambda * relu(Hbar - kappa H_0)^2
    kappa: float = 1.0
    lam: float = 1.0
    # Where the stabilizer is linearised when the batch is split in micro-batches
    # (see uecjax.train_step): "current" = an extra forward pass over the global batch with the
    # current parameters (exact always; free with one micro-batch), "old" = the global
    # token-mean entropy of the old-log-prob pass (free, but stale after the first of several
    # updates on a rollout batch, section 4a).
    stabilizer_anchor: str = "current"
    # -- entropy_reg (section 7) --
    entropy_coef: float = 0.01
    # -- clip_cov / kl_cov (section 7) --
    cov_frac: float = 2e-4
    clip_cov_lo: float = 1.0
    clip_cov_hi: float = 5.0
    kl_cov_coef: float = 1.0
    # -- entropy_adv (section 7) --
    entropy_adv_a: float = 0.4
    entropy_adv_k: float = 2.0
    # -- AER (section 9) --
    aer_alloc: str = "hard"  # hard | linear
    aer_tau: float = 0.4
    aer_rho: float = 0.6  # target H* = rho * H_0
    aer_eta: float = 0.01
    aer_alpha_max: float = 0.1
    aer_alpha0: float = 0.0
    # -- DAPO host-side switches (section 7) --
    overlong_buffer: float = 0.0  # soft overlong zone as a fraction of the response budget; 0 = off
    overlong_factor: float = 1.0
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (the rollout refills)
    # -- rollout-level exploration (section 8) --
    # C of the truncated weight min(pi_1 / pi_t', C) on exploration rows sampled at t'; 0 = off
    # (the authors' default). The host computes it; it reaches the loss as LossInputs.token_weight.
    explore_is_cap: float = 0.0

    def __post_init__(self):
        def bad(field, why):
            raise LossConfigError(f"LossConfig.{field}={getattr(self, field)!r}: {why}")

        choices = {"advantage": ADVANTAGE_KINDS, "agg": AGG_MODES, "kl_kind": KL_KINDS,
                   "gate": GATE_KINDS, "aer_alloc": ("hard", "linear"),
                   "stabilizer_anchor": STABILIZER_ANCHORS, "ratio_level": RATIO_LEVELS}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                bad(field, f"expected one of {allowed}")
        if not 0.0 <= self.eps_low < 1.0:
            bad("eps_low", "must be in [0, 1) so that the lower clip 1 - eps_low stays positive")
        if self.eps_high < 0.0:
            bad("eps_high", "must be >= 0")
        if self.dual_clip <= 1.0:
            bad("dual_clip", "must be > 1 (the dual-clip bound c * A lies beyond the clip range)")
        for field in ("beta", "alpha", "lam", "entropy_coef", "kl_cov_coef", "aer_eta",
                      "aer_alpha0", "overlong_factor", "explore_is_cap"):
            if getattr(self, field) < 0.0:
                bad(field, "must be >= 0")
        for field in ("kappa", "kl_clamp", "gate_s", "entropy_adv_k", "aer_alpha_max"):
            if getattr(self, field) <= 0.0:
                bad(field, "must be > 0")
        if self.gate == "linear" and self.gate_tau <= 0.0:
            bad("gate_tau", "the linear gate clip(1 - p / tau, 0, 1) needs tau > 0")
        if self.aer_alloc == "linear" and self.aer_tau <= 0.0:
            bad("aer_tau", "the linear allocation needs tau > 0")
        if not 0.0 < self.cov_frac <= 1.0:
            bad("cov_frac", "must be in (0, 1]")
        if self.clip_cov_lo >= self.clip_cov_hi:
            bad("clip_cov_lo", f"must be below clip_cov_hi={self.clip_cov_hi}")
        if self.aer_rho <= 0.0:
            bad("aer_rho", "must be > 0 (target entropy rho * H_0)")
        if self.aer_alpha0 > self.aer_alpha_max:
            bad("aer_alpha0", f"must be <= aer_alpha_max={self.aer_alpha_max}")
        if self.entropy_adv_a < 0.0:
            bad("entropy_adv_a", "must be >= 0")
        if not 0.0 <= self.overlong_buffer <= 1.0:
            bad("overlong_buffer", "is a fraction of the response budget, in [0, 1]")
        if self.agg_max_len is not None and self.agg_max_len < 1:
            bad("agg_max_len", "must be >= 1 or None")

    def replace(self, **changes) -> "LossConfig":
        return dataclasses.replace(self, **changes)

    def with_traced(self, **values) -> "LossConfig":
        """A copy holding traced values (e.g. a `vmap`ped hyperparameter sweep, uecjax.testbed)
        in fields the loss uses only arithmetically (`TRACEABLE_FIELDS`).

        The range checks of construction cannot run on tracers, so they are skipped for these
        values: the caller validates the concrete sweep values (`replace` with each of them).
        """
        bad = sorted(set(values) - set(TRACEABLE_FIELDS))
        if bad:
            raise LossConfigError(f"LossConfig field(s) {bad} cannot be traced (a Python branch or a "
                                  f"static shape depends on them); traceable: {TRACEABLE_FIELDS}")
        new = dataclasses.replace(self)
        for field, value in values.items():
            object.__setattr__(new, field, value)
        return new


# Fields that enter the loss and the controller only through arithmetic, so that they can be
# traced arrays (LossConfig.with_traced).
TRACEABLE_FIELDS = ("alpha", "gate_tau", "gate_s", "kappa", "lam", "entropy_coef", "kl_cov_coef",
                    "eps_high", "aer_rho", "aer_eta", "aer_alpha_max")
