"""PPO-style updates of one rollout batch: mini-batches and epochs (ALGORITHMS.md section 4a).

    plan = UpdatePlan(updates_per_rollout=4, epochs=1, seed=cfg.seed)
    for k in range(plan.total):
        minibatch = rows.select(plan.rows_of(step, k, len(rows), hosts.index))

One rollout batch gives `updates_per_rollout` updates on disjoint mini-batches, for `epochs`
passes, with pi_old and the reference fixed at rollout time (so the clip acts from the second
update on). Rows are reshuffled per epoch from (seed, step, epoch, share index), a pure
function: a run resumed between two updates takes the same mini-batches. One mini-batch keeps
the rollout order. docs/DESIGN.md, "Updates per rollout, controller, optimizer".
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class UpdatePlan:
    updates_per_rollout: int = 1
    epochs: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("updates_per_rollout", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r}: must be an integer >= 1")

    @property
    def total(self) -> int:
        """Optimizer updates per rollout batch."""
        return self.updates_per_rollout * self.epochs

    def rows_of(self, step: int, k: int, n_rows: int, share_index: int = 0) -> np.ndarray:
        """Indices into this share's n_rows rollout rows of update k (0-based) of rollout `step`."""
        U = self.updates_per_rollout
        if n_rows % U:
            raise ValueError(f"{n_rows} rollout rows do not split into train.updates_per_rollout={U} "
                             "equal mini-batches")
        if not 0 <= k < self.total:
            raise ValueError(f"update {k} outside the {self.total} updates of a rollout")
        epoch, part = divmod(k, U)
        if U == 1:
            order = np.arange(n_rows)
        else:
            order = np.random.default_rng((self.seed, step, epoch, share_index)).permutation(n_rows)
        size = n_rows // U
        return order[part * size:(part + 1) * size]


def mean_metrics(updates: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over a rollout's updates (keys every update reported); one update: itself."""
    if not updates:
        return {}
    keys = [k for k in updates[0] if all(k in u for u in updates)]
    return {k: float(np.mean([u[k] for u in updates])) for k in keys}
