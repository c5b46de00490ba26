"""Saving and resuming a training run: the arrays (params, optimizer and controller state),
the rollout's buffers, every process's data iterator state, and a rollout interrupted between
two of its updates. Resuming continues exactly where the run stopped.

Checkpoints are numbered by scheduled updates (rollout step * updates per rollout + updates
done). Each process's grain iterator has its own state: `data_iterator` holds process 0's,
`data_iterators` (multi-process runs) every process's in process order. Rows that a share keeps
for a later step are saved per share (`buffer_<b>`, `replay_<b>`, `pending_<b>`). Resuming
needs the run's process count; process 0 writes the JSON, every process its array shards.
"""

from __future__ import annotations

import dataclasses

import jax

from uecjax import checkpoint as ckpt
from uecjax.models import CheckpointError
from uecjax.parallel.gather import allgather_objects
from uecjax.parallel.hosts import Hosts
from uecjax.rows import RowBuffer, Rows


@dataclasses.dataclass
class Pending:
    """A rollout step stopped (preempted) after `done` of its updates: its rows, its rollout
    metrics and time, and the metrics of the updates done (host floats)."""

    rows: Rows
    roll_stats: dict
    done: int
    metrics: list
    t_rollout: float


@dataclasses.dataclass
class Resumed:
    params: object
    opt_state: object
    control: object
    step: int  # rollout steps finished
    history: dict  # "initial" (and "final") held-out evaluations
    pending: Pending | None


class RunCheckpoints:
    """The run's checkpoints in `directory` (orbax, atomic), with what a step needs besides
    the arrays: the rollout (its call count, buffers) and this process's data iterator."""

    def __init__(self, directory: str, *, keep: int, rollout, data_iterator, hosts: Hosts,
                 updates_per_rollout: int, method: str, config_json: str):
        self.checkpointer = ckpt.Checkpointer(directory, max_to_keep=keep)
        self.directory = self.checkpointer.directory
        self.rollout, self.data_iterator, self.hosts = rollout, data_iterator, hosts
        self.updates_per_rollout = updates_per_rollout
        self.method, self.config_json = method, config_json

    def _name(self, name: str, share: int) -> str:
        return f"{name}_{share}" if self.hosts.count > 1 else name

    def restore(self, params, opt_state, control, log) -> Resumed | None:
        """The latest checkpoint onto these arrays' shapes and shardings (None: none yet);
        the rollout and the data iterator are restored in place."""
        if self.checkpointer.latest_step() is None:
            return None
        restored = self.checkpointer.restore(
            params_target=ckpt.abstract_like(params), opt_state_target=ckpt.abstract_like(opt_state),
            control_target=ckpt.abstract_like(control))
        for skipped_step, why in restored.get("skipped", []):
            log(f"checkpoint {skipped_step} does not restore ({why}); using an older one")
        meta = restored["meta"]
        self.data_iterator.set_state(own_iterator_state(meta, jax.process_index(),
                                                        jax.process_count()))
        self.rollout.calls = meta["rollout_calls"]
        buffers = restored["buffers"] or {}
        share = self.hosts.index
        self.rollout.buffer.load(buffers.get(self._name("buffer", share)))
        self.rollout.replay.load(buffers.get(self._name("replay", share)))
        pending = None
        if meta.get("pending"):  # saved between two updates of rollout step + 1
            held = RowBuffer()
            held.load(buffers.get(self._name("pending", share)))
            pending = Pending(rows=held.rows, **meta["pending"])
        return Resumed(restored["params"], restored["opt_state"], restored["control"],
                       meta["step"], meta["history"], pending)

    def save(self, step: int, params, opt_state, control, history: dict, *,
             pending: Pending | None = None, force: bool = False) -> None:
        """Checkpoint after `step` rollouts, or inside rollout step + 1 with `pending`. A
        collective with several processes (buffers and iterator states are all-gathered)."""
        held_rows = None
        if pending is not None:
            held = RowBuffer()
            held.push(pending.rows)
            held_rows = held.state()
        buffers = {}
        every_share = self.hosts.gather((self.rollout.buffer.state(), self.rollout.replay.state(),
                                         held_rows))
        for share, states in enumerate(every_share):
            for name, state in zip(("buffer", "replay", "pending"), states):
                if state is not None:
                    buffers[self._name(name, share)] = state
        states = allgather_objects(self.data_iterator.get_state())
        meta = dict(step=step, history=history, data_iterator=states[0],
                    rollout_calls=self.rollout.calls, method=self.method, config=self.config_json)
        if len(states) > 1:
            meta["data_iterators"] = states
        done = 0
        if pending is not None:
            done = pending.done
            meta["pending"] = dict(done=pending.done, roll_stats=pending.roll_stats,
                                   metrics=pending.metrics, t_rollout=pending.t_rollout)
        self.checkpointer.save(step * self.updates_per_rollout + done, params=params,
                               opt_state=opt_state, control=control, meta=meta,
                               buffers=buffers or None, force=force)

    def close(self) -> None:
        self.checkpointer.wait()
        self.checkpointer.close()


def own_iterator_state(meta: dict, process_index: int, process_count: int):
    """This process's data iterator state from a checkpoint's meta (`data_iterators` saved by
    multi-process runs, one per process; `data_iterator`, process 0's, otherwise)."""
    states = meta.get("data_iterators")
    if states is None:
        if process_count > 1:
            raise CheckpointError(
                f"the checkpoint holds one data iterator state, this run has {process_count} "
                "processes: resume it with one process (it was written before per-process "
                "data shards, or by a one-process run)")
        return meta["data_iterator"]
    if len(states) != process_count:
        raise CheckpointError(
            f"the checkpoint holds data iterator states of {len(states)} processes, this run "
            f"has {process_count}: resume with {len(states)} processes")
    return states[process_index]
