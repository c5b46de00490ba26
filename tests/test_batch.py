"""The host-side batch builder against numpy formulas (ALGORITHMS.md sections 2, 5, 7)."""

import numpy as np
import pytest

from uecjax.batch import build_batch, informative_groups
from uecjax.objectives.methods import loss_config
from uecjax.sampler import SamplerOutput


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


def test_build_batch_matches_numpy():
    out = fake_output()
    rewards = np.array([1.0, 0.0, 0.1, 0.0, 0.1, 0.0], np.float32)
    acc = np.array([1, 0, 0, 0, 0, 0], np.float32)
    b = build_batch(out, rewards, acc, group_size=3, hp=loss_config("grpo"))
    g = rewards.reshape(2, 3)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(b.advantages, adv.reshape(-1), rtol=1e-5)
    np.testing.assert_allclose(b.difficulty, [1 / 3] * 3 + [0.0] * 3, rtol=1e-6)
    np.testing.assert_array_equal(b.is_hard, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(b.tokens[0], [0, 5, 6, 11, 11, 11, 11])
    np.testing.assert_array_equal(b.attention_mask[1], [0, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b.positions[0], [0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b.positions[3], [0, 1, 2, 3, 4, 5, 5])
    assert (b.prompt_len, b.response_len) == (3, 4)
    np.testing.assert_array_equal(b.sampler_logp, out.logprobs)
    assert b.old_logp is None and b.ref_logp is None

    rloo = build_batch(out, rewards, acc, group_size=3, hp=loss_config("grpo", advantage="rloo"))
    loo = g - (g.sum(1, keepdims=True) - g) / 2
    np.testing.assert_allclose(rloo.advantages, loo.reshape(-1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="groups of 4"):
        build_batch(out, rewards, acc, group_size=4, hp=loss_config("grpo"))


def test_dapo_overlong_shaping_and_dynamic_sampling():
    out = fake_output()
    rewards = np.ones(6, np.float32)
    hp = loss_config("dapo", overlong_buffer=0.5)  # soft zone: lengths 2..4 of a budget of 4
    b = build_batch(out, rewards, rewards, group_size=3, hp=hp, response_budget=4)
    lengths = out.response_mask.sum(1)
    shaped = 1.0 - np.clip((lengths - 2) / 2, 0, 1)
    g = shaped.reshape(2, 3)
    adv = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(b.advantages, adv.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(informative_groups([1, 0, 1, 1, 1, 1], 3), [True, False])
