"""Controller state of the train step: H_0, AER's coefficient, step counter, rng (sections 6, 9).

A pytree of plain arrays, so it is checkpointed with the parameters. H_0 starts as NaN
("unset"). The training loop sets it before the first update from the initial policy's own
samples: the token-mean entropy of the first rollout's regular groups before any selection
(`uecjax.loop.set_h0`); a step that still finds it unset takes its own batch's token-mean entropy
under the old policy, but only from a batch with tokens. It is kept from then on.
AER's coefficient moves on the host after each step (`update_control`, section 9).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from uecjax.objectives.entropy_control import aer_target, aer_update
from uecjax.objectives.loss_config import LossConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ControlState:
    h0: jax.Array  # float32 [], NaN until the first step sets it
    aer_alpha: jax.Array  # float32 [], AER's global entropy coefficient alpha_k
    step: jax.Array  # int32 [], optimizer updates done
    rng: jax.Array  # uint32 [2], raw key data (clip_cov's random token choice)

    def replace(self, **changes) -> "ControlState":
        return dataclasses.replace(self, **changes)


def init_control_state(loss_cfg: LossConfig, seed: int = 0, h0: float | None = None) -> ControlState:
    """Fresh controller state; h0=None lets the first step set H_0."""
    return ControlState(
        h0=jnp.float32(np.nan if h0 is None else h0),
        aer_alpha=jnp.float32(loss_cfg.aer_alpha0),
        step=jnp.int32(0),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def update_control(control: ControlState, metrics, loss_cfg: LossConfig) -> ControlState:
    """Host-side controller update after a step (section 9):

        alpha_{k+1} = clip(alpha_k + eta * (H* - Hbar_k), 0, alpha_max),   H* = rho * H_0

    with Hbar_k the step's token-mean entropy (metrics["entropy"]). Only `aer` moves alpha.
    """
    if loss_cfg.method != "aer":
        return control
    h0 = float(jax.device_get(control.h0))
    if np.isnan(h0):  # no token seen yet: no target to move towards
        return control
    alpha = aer_update(float(jax.device_get(control.aer_alpha)), float(jax.device_get(metrics["entropy"])),
                       aer_target(h0, loss_cfg.aer_rho), loss_cfg.aer_eta, loss_cfg.aer_alpha_max)
    return control.replace(aer_alpha=jnp.float32(alpha))


def update_control_traced(control: ControlState, mean_entropy, loss_cfg: LossConfig) -> ControlState:
    """`update_control` as traced jnp code (the compiled testbed runs it inside its jit): the
    same rule in float32, alpha left as it is while H_0 is unset."""
    if loss_cfg.method != "aer":
        return control
    h_star = loss_cfg.aer_rho * control.h0
    alpha = jnp.clip(control.aer_alpha + loss_cfg.aer_eta * (h_star - mean_entropy), 0.0, loss_cfg.aer_alpha_max)
    alpha = jnp.where(jnp.isnan(control.h0), control.aer_alpha, alpha)
    return control.replace(aer_alpha=jnp.asarray(alpha, jnp.float32))
