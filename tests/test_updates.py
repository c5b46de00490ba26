"""PPO mini-batch updates (ALGORITHMS.md section 4a): the plan's mini-batches, the clip acting
from the second update on, the learning rate outside the optimizer (replay updates leave the
schedule), and the loop's updates: one mini-batch is one step on the rollout batch, resume
between two updates of a rollout equals the uninterrupted run."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from loop_helpers import tiny_config, write_policy
from train_helpers import SGD_LIKE, host, random_batch, single_mesh, tiny_model, with_logprobs
from uecjax import checkpoint as ckpt
from uecjax.objectives.methods import loss_config
from uecjax.optim import OptimConfig, make_optimizer
from uecjax.train_step import TrainStep
from uecjax.updates import UpdatePlan, mean_metrics


def test_plan_mini_batches_cover_each_epoch_and_reshuffle():
    assert UpdatePlan(1, 1).rows_of(3, 0, 8).tolist() == list(range(8))  # rollout order
    assert UpdatePlan(1, 3).rows_of(3, 2, 8).tolist() == list(range(8))  # nothing to reorder
    plan = UpdatePlan(updates_per_rollout=4, epochs=2, seed=5)
    epochs = [[plan.rows_of(7, e * 4 + u, 16) for u in range(4)] for e in range(2)]
    for parts in epochs:
        assert all(len(p) == 4 for p in parts)
        assert sorted(np.concatenate(parts).tolist()) == list(range(16))  # disjoint, complete
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))  # reshuffled
    assert np.array_equal(plan.rows_of(7, 5, 16), UpdatePlan(4, 2, 5).rows_of(7, 5, 16))  # pure
    assert not np.array_equal(plan.rows_of(7, 0, 16), plan.rows_of(8, 0, 16))  # per rollout step
    assert not np.array_equal(plan.rows_of(7, 0, 16, 0), plan.rows_of(7, 0, 16, 1))  # per share
    with pytest.raises(ValueError, match="updates_per_rollout=4"):
        plan.rows_of(7, 0, 10)
    with pytest.raises(ValueError, match="train.epochs=0"):
        UpdatePlan(2, 0)
    assert mean_metrics([{"a": 1.5, "b": 2.0}]) == {"a": 1.5, "b": 2.0}
    assert mean_metrics([{"a": 1.0, "b": 1.0}, {"a": 3.0}]) == {"a": 2.0}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_learning_rate_outside_the_optimizer_is_the_scheduled_adamw(model):
    """The step scales AdamW's direction by schedule(step) itself: the update of optax's own
    scheduled AdamW (the optimizer before this change), over a warm-up schedule, to float32
    rounding (the reference runs op by op, the step fused under jit)."""
    optim = OptimConfig(learning_rate=0.05, warmup_steps=3, schedule="warmup_cosine", total_steps=10,
                        weight_decay=0.1)
    ts = TrainStep(model, loss_config("grpo", beta=0.0), optim, single_mesh())
    params, opt_state, control = ts.init(nnx.state(model))
    reference = make_optimizer(optim)  # schedule inside, counted by optax
    ref_params, ref_state = host(params), reference.init(host(params))
    for seed in (1, 2):
        batch = with_logprobs(ts, params, random_batch(seed=seed))
        grads, _, _ = ts.gradients(params, control, batch)
        updates, ref_state = reference.update(host(grads), ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        params, opt_state, control, metrics = ts.step(params, opt_state, control, batch)
        for a, b in zip(jax.tree.leaves(host(params)), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
        ref_params = host(params)  # each step from the same point: no drift across steps
    assert int(control.step) == 2


def test_replay_updates_do_not_advance_the_schedule(model):
    optim = OptimConfig(learning_rate=1.0, warmup_steps=4, eps=1.0, max_grad_norm=0.0)
    ts = TrainStep(model, loss_config("grpo", beta=0.0), optim, single_mesh())
    params, opt_state, control = ts.init(nnx.state(model))
    batch = with_logprobs(ts, params, random_batch(seed=1))
    params, opt_state, control, m1 = ts.step(params, opt_state, control, batch)
    params, opt_state, control, m2 = ts.step(params, opt_state, control, batch, advance_schedule=False)
    assert int(control.step) == 1 and float(m2["lr"]) == float(m1["lr"]) + 0.25 == 0.25
    params, opt_state, control, m3 = ts.step(params, opt_state, control, batch)
    assert int(control.step) == 2 and float(m3["lr"]) == 0.25


def test_second_update_clips_and_dapo_differs_from_grpo(model):
    """With pi_old fixed at rollout time, the first update moves the policy: on the second
    mini-batch the ratio leaves 1, the clip fractions are non-zero and DAPO's clip-higher
    changes the gradient. On the first update the two gradients are identical."""
    grpo = TrainStep(model, loss_config("grpo", beta=0.0), SGD_LIKE, single_mesh())
    dapo = TrainStep(model, loss_config("dapo"), SGD_LIKE, single_mesh())
    params, opt_state, control = grpo.init(nnx.state(model))
    rollout = with_logprobs(grpo, params, random_batch(B=32, seed=3))
    first, second = (jax.tree.map(lambda x, i=i: None if x is None else x[i * 16:(i + 1) * 16], rollout)
                     for i in range(2))
    g_grpo, m0, _ = grpo.gradients(params, control, first)
    g_dapo, _, _ = dapo.gradients(params, control, first)
    for a, b in zip(jax.tree.leaves(host(g_grpo)), jax.tree.leaves(host(g_dapo))):
        np.testing.assert_array_equal(a, b)
    assert m0["clip_frac_low"] == m0["clip_frac_high"] == 0.0

    params, opt_state, control, _ = grpo.step(params, opt_state, control, first)
    ratio = np.exp(np.asarray(grpo.compute_logprobs(params, second)[0]) - second.old_logp)
    positive = (second.advantages[:, None] > 0) & (second.response_mask > 0)
    assert ((ratio > 1.2) & (ratio <= 1.28) & positive).any()  # clipped by GRPO only
    g_grpo, m1, _ = grpo.gradients(params, control, second)
    g_dapo, m1_dapo, _ = dapo.gradients(params, control, second)
    assert m1["clip_frac_low"] + m1["clip_frac_high"] > 0
    assert m1_dapo["clip_frac_high"] < m1["clip_frac_high"]  # eps_high 0.28 clips fewer
    diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(host(g_grpo)),
                                                          jax.tree.leaves(host(g_dapo))))
    assert diff > 1e-4


# ---- the loop ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policy"))


def _record_steps(monkeypatch):
    """Every batch the loop's TrainStep.step trains on, and every rollout batch."""
    from uecjax import rollout as rollout_mod

    batches, rollouts = [], []
    step, collect = TrainStep.step, rollout_mod.Rollout.collect

    def recording_step(self, params, opt_state, control, batch, **kw):
        batches.append(host(batch.response_mask))
        return step(self, params, opt_state, control, batch, **kw)

    def recording_collect(self, params):
        rows, stats = collect(self, params)
        rollouts.append(rows.response_mask.copy())
        return rows, stats

    monkeypatch.setattr(TrainStep, "step", recording_step)
    monkeypatch.setattr(rollout_mod.Rollout, "collect", recording_collect)
    return batches, rollouts


def test_loop_one_update_is_the_rollout_batch_and_two_split_it(policy_dir, tmp_path, monkeypatch):
    from uecjax.loop import train

    batches, rollouts = _record_steps(monkeypatch)
    c = tiny_config(policy_dir, "grpo", steps=1)
    c.rollout.prompts_per_batch = 4
    train(c, str(tmp_path / "one"), log_console=None)
    assert len(batches) == len(rollouts) == 1
    np.testing.assert_array_equal(batches[0], rollouts[0])  # all rows, rollout order

    batches.clear(), rollouts.clear()
    c.train.updates_per_rollout, c.train.epochs = 2, 2
    train(c, str(tmp_path / "four"), log_console=None)
    assert len(rollouts) == 1 and len(batches) == 4 and all(len(b) == 4 for b in batches)
    plan = UpdatePlan(2, 2, c.seed)
    for k, b in enumerate(batches):
        np.testing.assert_array_equal(b, rollouts[0][plan.rows_of(1, k, 8)])
    row = [json.loads(line) for line in open(tmp_path / "four" / "metrics.jsonl") if '"loss"' in line][0]
    assert row["updates"] == 4.0


def test_resume_between_updates_of_a_rollout_equals_uninterrupted(policy_dir, tmp_path, monkeypatch):
    """A preemption after the first of two updates of rollout 2 saves the rollout's rows and
    position; the resumed run takes the remaining update and goes on exactly as the run that
    was never stopped."""
    from uecjax.loop import train

    def cfg():
        c = tiny_config(policy_dir, "uec", steps=2)
        c.train.updates_per_rollout = 2
        c.train.checkpoint_every = 0
        c.train.export_hf = True
        return c

    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(), str(full), log_console=None)
    monkeypatch.setattr(ckpt, "preemption_requested", lambda update=None: update == 3)
    summary = train(cfg(), str(part), log_console=None)
    assert summary["preempted"] and summary["step"] == 2
    saved = ckpt.Checkpointer(str(part / "checkpoints"), read_only=True)
    assert saved.all_steps() == [3]  # numbered by updates: 2 of rollout 1 and 1 of rollout 2
    monkeypatch.setattr(ckpt, "preemption_requested", lambda update=None: False)
    train(cfg(), str(part), log_console=None)

    def step_rows(path):
        rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
        return {r["step"]: r for r in rows if "loss" in r}

    a, b = step_rows(full), step_rows(part)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        for key in ("loss", "entropy", "reward", "grad_norm", "kl_ref", "h0", "clip_frac_low",
                    "clip_frac_high", "updates"):
            assert a[step][key] == b[step][key], (step, key)
    wa = load_file(str(full / "export" / "model.safetensors"))
    wb = load_file(str(part / "export" / "model.safetensors"))
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    # H_0 comes from the first rollout's regular samples, before any selection.
    assert a[1]["h0"] == pytest.approx(a[1]["rollout/regular_entropy"], rel=1e-6)
