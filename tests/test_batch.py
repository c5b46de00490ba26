"""Host rows -> the train step's batch (`uecjax.batch`), with the rollout's group statistics
(`uecjax.groups`), against numpy formulas (ALGORITHMS.md sections 2, 5, 7, 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.batch import host_batch, to_device
from uecjax.groups import group_stats, informative_groups, shaped_rewards
from uecjax.objectives.methods import loss_config
from uecjax.rows import Rows
from uecjax.sampler import SamplerOutput
from uecjax.parallel.mesh import batch_sharding, make_mesh


def fake_output():
    """2 prompts x 3 samples, prompt width 3 (left-padded), response width 4."""
    prompt_tokens = np.array([[0, 5, 6]] * 3 + [[7, 8, 9]] * 3, np.int32)
    prompt_mask = (prompt_tokens > 0).astype(np.int32)
    response_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0],
                              [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    response_tokens = np.where(response_mask > 0, 11, 0).astype(np.int32)
    return SamplerOutput(prompt_tokens, prompt_mask, response_tokens, response_mask,
                         logprobs=-0.5 * response_mask.astype(np.float32),
                         truncated=response_mask.sum(1) == 4)


def sampled_rows(rewards, acc, group_size, loss_cfg, response_budget=4):
    """The rollout's path: sampler output -> rows -> shaped rewards, group advantages and
    success rates (`uecjax.groups`)."""
    out = fake_output()
    rows = Rows.from_sampler(out, prompt_width=3)
    rows.reward, rows.accuracy = np.asarray(rewards, np.float32), np.asarray(acc, np.float32)
    shaped = shaped_rewards(rows.reward, rows.response_mask.sum(1), response_budget, loss_cfg)
    stats = group_stats(shaped, rows.accuracy, group_size, loss_cfg.advantage)
    rows.advantage, rows.success_rate = stats.advantage, stats.success_rate
    return out, rows


def test_host_batch_of_sampled_rows_matches_numpy():
    rewards = np.array([1.0, 0.0, 0.1, 0.0, 0.1, 0.0], np.float32)
    acc = np.array([1, 0, 0, 0, 0, 0], np.float32)
    out, rows = sampled_rows(rewards, acc, 3, loss_config("grpo"))
    b = host_batch(rows)
    g = rewards.reshape(2, 3)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(b.advantages, adv.reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(b.success_rate, [1 / 3] * 3 + [0.0] * 3, rtol=1e-6)
    np.testing.assert_array_equal(b.is_hard, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b.tokens[0], [0, 5, 6, 11, 11, 11, 11])
    np.testing.assert_array_equal(b.attention_mask[1], [0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b.positions[3], [0, 1, 2, 3, 4, 5, 5])
    assert (b.prompt_len, b.response_len) == (3, 4)
    np.testing.assert_array_equal(b.sampler_logp, out.logprobs)
    assert b.old_logp is None and b.ref_logp is None and b.token_weight is None
    np.testing.assert_array_equal(b.explore, np.zeros(6))

    _, rloo = sampled_rows(rewards, acc, 3, loss_config("grpo", advantage="rloo"))
    loo = g - (g.sum(1, keepdims=True) - g) / 2
    np.testing.assert_allclose(rloo.advantage, loo.reshape(-1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="groups of 4"):
        group_stats(rewards, acc, 4)
    # Exploration groups keep the success rate measured on their prompts' regular groups.
    explored = group_stats(rewards, None, 3, prompt_success=[0.0, 0.5])
    np.testing.assert_array_equal(explored.success_rate, [0, 0, 0, 0.5, 0.5, 0.5])


def test_dapo_overlong_shaping_and_dynamic_sampling():
    rewards = np.ones(6, np.float32)
    loss_cfg = loss_config("dapo", overlong_buffer=0.5)  # soft zone: lengths 2..4 of a budget of 4
    out, rows = sampled_rows(rewards, rewards, 3, loss_cfg, response_budget=4)
    lengths = out.response_mask.sum(1)
    shaped = 1.0 - np.clip((lengths - 2) / 2, 0, 1)
    g = shaped.reshape(2, 3)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(host_batch(rows).advantages, adv.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(informative_groups([1, 0, 1, 1, 1, 1], 3), [True, False])


def explore_rows(rng):
    """4 rows (2 regular, 2 exploration) of response width 5, then 4 padding rows."""
    n, R = 4, 5
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], np.float32)
    rows = Rows(prompt_tokens=np.ones((n, 2), np.int32), prompt_mask=np.ones((n, 2), np.int32),
                response_tokens=np.ones((n, R), np.int32), response_mask=mask,
                sampler_logp=rng.uniform(-3, 0, (n, R)).astype(np.float32),
                old_logp=rng.uniform(-3, 0, (n, R)).astype(np.float32),
                old_entropy=np.ones((n, R), np.float32), ref_logp=None,
                advantage=np.zeros(n, np.float32), success_rate=np.zeros(n, np.float32),
                reward=np.zeros(n, np.float32), accuracy=np.zeros(n, np.float32),
                truncated=np.zeros(n, bool), explore=np.array([False, True, False, True]))
    rows.sampler_logp[3, 4] = -np.inf  # off the mask: whatever the sampler left there
    return Rows.concat([rows, Rows.empty(4, 2, R, with_ref=False)])


def test_exploration_flag_and_truncated_importance_weights():
    """token_weight = min(pi_1 / pi_T', C) on exploration rows' response tokens, else 1."""
    rows = explore_rows(np.random.default_rng(0))
    batch = host_batch(rows)
    np.testing.assert_array_equal(batch.explore, [0, 1, 0, 1, 0, 0, 0, 0])
    assert batch.explore.dtype == np.float32 and batch.token_weight is None
    for cap in (0.5, 2.0, 1e6):
        w = host_batch(rows, explore_is_cap=cap).token_weight
        ref = np.ones(rows.response_mask.shape)
        for i in np.flatnonzero(rows.explore):
            for t in np.flatnonzero(rows.response_mask[i]):
                ref[i, t] = min(np.exp(float(rows.old_logp[i, t]) - float(rows.sampler_logp[i, t])), cap)
        assert w.dtype == np.float32 and w.shape == (8, 5)
        np.testing.assert_allclose(w, ref, rtol=1e-6)
        assert (w <= max(cap, 1.0)).all() and (w[~rows.explore] == 1).all()
    on = rows.explore[:, None] & (rows.response_mask > 0)
    w = host_batch(rows, explore_is_cap=0.5).token_weight
    assert (w[on] <= 0.5).all() and (w[~on] == 1).all() and (w[on] == 0.5).any()  # cap binds
    with pytest.raises(ValueError, match="C > 0"):
        rows.importance_weight(0.0)


def test_new_fields_shard_with_the_batch_and_trace_under_jit():
    mesh = make_mesh((8, 1, 1))
    rows = explore_rows(np.random.default_rng(1))
    sharding = batch_sharding(mesh)

    @jax.jit
    def total(batch):
        weight = 1.0 if batch.token_weight is None else batch.token_weight
        return jnp.sum(batch.explore[:, None] * weight * batch.response_mask)

    for cap in (0.0, 2.0):
        host = host_batch(rows, explore_is_cap=cap)
        placed = to_device(rows, sharding, explore_is_cap=cap)
        assert (placed.token_weight is None) == (cap == 0)
        for leaf in (placed.explore, placed.token_weight, placed.advantages):
            if leaf is not None:
                assert leaf.sharding == sharding
        weight = 1.0 if host.token_weight is None else host.token_weight
        np.testing.assert_allclose(total(placed), np.sum(host.explore[:, None] * weight
                                                         * host.response_mask), rtol=1e-6)
