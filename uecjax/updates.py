"""PPO-style updates of one rollout batch: mini-batches and epochs (ALGORITHMS.md section 4a).

One rollout batch of B * G rows gives `updates_per_rollout` optimizer updates on disjoint
mini-batches of B * G / updates_per_rollout rows, for `epochs` passes; the old and reference
log-probs stay those of rollout time, so from the second update on the ratio pi / pi_old
leaves 1 and the clip, the dual clip and DAPO's clip-higher act (verl's ppo_mini_batch_size
and ppo_epochs, TRL's num_iterations, tunix's num_iterations). Each mini-batch is aggregated
over its own rows (its own global token count), with its own micro-batch accumulation.

Rows are reshuffled for every epoch with the run's seed, the rollout step and the epoch (and,
with several row shares, the share: each process orders only its own rows, and the u-th
mini-batch of the global batch is every share's u-th slice). With one mini-batch nothing is
reordered, so updates_per_rollout = epochs = 1 is exactly one update on the rollout batch in
rollout order. The order is a pure function of those numbers: a run resumed between two
updates of a rollout takes the same mini-batches as the uninterrupted run.

    plan = UpdatePlan(updates_per_rollout=4, epochs=1, seed=cfg.seed)
    for k in range(plan.total):
        minibatch = rows.select(plan.rows_of(step, k, len(rows), share.index))
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
