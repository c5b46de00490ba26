"""Rollout logic (ALGORITHMS.md sections 2, 5, 7, 8) with a scripted sampler and grader."""

import concurrent.futures
import dataclasses
import itertools

import numpy as np
import pytest

from uecjax.objectives.methods import loss_config
from uecjax.rollout import Prompt, Rollout, RolloutConfig, rollout_config
from uecjax.sampler import SamplerOutput
from uecjax.sharding import RowShare


@dataclasses.dataclass
class Reward:
    reward: float
    accuracy: float


class ScriptedSampler:
    """Response j of prompt i (at temperature T) is correct when `success(i_id, j, T)`."""

    def __init__(self, success, R=6):
        self.success, self.R, self.calls = success, R, []

    def __call__(self, prompts, params, images=None, share=RowShare()):
        self.calls.append((len(prompts), params.n, params.temperature))
        prompts = prompts[share.block(len(prompts))]  # the rows of this share's prompts
        rows = len(prompts) * params.n
        P = max(len(p) for p in prompts)
        prompt_tokens = np.zeros((rows, P), np.int32)
        prompt_mask = np.zeros((rows, P), np.int32)
        resp = np.zeros((rows, self.R), np.int32)
        for i, p in enumerate(prompts):
            for j in range(params.n):
                r = i * params.n + j
                prompt_tokens[r, P - len(p):], prompt_mask[r, P - len(p):] = p, 1
                resp[r, 0] = p[0]  # which prompt
                resp[r, 1] = 1 + int(self.success(p[0], j, params.temperature))
        mask = np.ones((rows, self.R), np.int32)
        return SamplerOutput(prompt_tokens, prompt_mask, resp, mask,
                             np.full((rows, self.R), -1.0, np.float32), np.zeros(rows, bool))


def grade(texts, answers, choices):
    future = concurrent.futures.Future()
    future.set_result([Reward(float(t == "ok"), float(t == "ok")) for t in texts])
    return future


def score(prompt_tokens, prompt_mask, response_tokens, response_mask, images=None):
    n, R = response_tokens.shape
    return np.full((n, R), -0.5, np.float32), np.full((n, R), 1.0, np.float32), None


def make(cfg, success, method="grpo", **hp):
    prompts = (Prompt(ids=[i, 100 + i], answer="x") for i in itertools.count(1))
    sampler = ScriptedSampler(success)
    decode = lambda ids: "ok" if ids[1] == 2 else "no"  # noqa: E731
    rollout = Rollout(cfg, loss_config(method, **hp), sampler=sampler, prompts=prompts,
                      grade=grade, score=score, decode=decode, stop_token_ids=())
    return rollout, sampler


def test_grpo_round_gives_one_batch_with_group_advantages():
    cfg = RolloutConfig(prompts_per_batch=4, group_size=4, max_prompt_len=4, max_new_tokens=6)
    rollout, sampler = make(cfg, lambda i, j, T: j < i % 4)  # prompt i: (i % 4) of 4 correct
    rows, stats = rollout.collect()
    assert len(rows) == 16 and sampler.calls == [(4, 4, 1.0)]
    r = rows.reward.reshape(4, 4)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rows.advantage, expected.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows.difficulty, np.repeat(r.mean(1), 4))
    assert rows.old_logp.shape == (16, 6) and (rows.old_logp == -0.5).all()
    assert stats["reward"] == pytest.approx(r.mean()) and stats["rollout/rounds"] == 1
    batch = rows.to_batch(tau_hard=0.0)
    assert batch.tokens.shape == (16, 10) and (batch.is_hard == (rows.difficulty <= 0)).all()


def test_uec_explores_hard_prompts_and_keeps_rare_successes():
    cfg = rollout_config("uec", prompts_per_batch=2, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore_samples=8, explore_temperature=1.2)
    # Odd prompts: every regular sample fails (hard); at T'=1.2 one of 8 succeeds.
    # Even prompts: 2 of 4 succeed (informative).
    def success(i, j, T):
        return (j == 3) if T > 1.0 else (i % 2 == 0 and j < 2)

    rollout, sampler = make(cfg, success, method="uec")
    rows, stats = rollout.collect()
    assert len(rows) == 8
    assert (8 / 1, 8, 1.2) not in sampler.calls and (1, 8, 1.2) in sampler.calls
    # Regular rows of hard prompts (A = 0) are dropped; the exploration success (A' > 1) kept.
    explored = rows.explore
    assert explored.any() and (rows.accuracy[explored] == 1).all()
    assert (rows.advantage[explored] > 1).all() and (rows.difficulty[explored] == 0).all()
    assert (np.abs(rows.advantage[~explored]) > 0.05).all()
    assert stats["explore/hard_prompts"] >= 1 and stats["explore/kept"] >= 1


def test_dapo_dynamic_sampling_refills_from_further_prompts():
    cfg = RolloutConfig(prompts_per_batch=2, group_size=2, max_prompt_len=4, max_new_tokens=6)
    # Only prompts divisible by 3 have mixed outcomes; the others are all-fail groups.
    rollout, sampler = make(cfg, lambda i, j, T: i % 3 == 0 and j == 0, method="dapo")
    rows, stats = rollout.collect()
    assert len(rows) == 4 and (rows.advantage != 0).all()
    prompts_used = {int(t) for t in rows.response_tokens[:, 0]}
    assert all(i % 3 == 0 for i in prompts_used)
    assert stats["rollout/rounds"] >= 2 and stats["rollout/padded_rows"] == 0


def test_batch_is_padded_with_weightless_rows_after_max_rounds():
    cfg = RolloutConfig(prompts_per_batch=2, group_size=2, max_prompt_len=4, max_new_tokens=6,
                        max_rounds=2)
    rollout, _ = make(cfg, lambda i, j, T: False, method="dapo")  # nothing is informative
    rows, stats = rollout.collect()
    assert len(rows) == 4 and stats["rollout/padded_rows"] == 4
    assert rows.response_mask.sum() == 0 and (rows.advantage == 0).all()


def test_replay_fifo_and_schedule():
    cfg = rollout_config("uec_code", prompts_per_batch=2, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore=False, retention=False, replay_every=2)
    rollout, _ = make(cfg, lambda i, j, T: j == 0)  # one success of four: A = 1.5 > A_0
    rng = np.random.default_rng(0)
    for step in range(1, 5):
        rows, _ = rollout.collect()
        rollout.after_update(rows)
        batch = rollout.replay_batch(step, rng)
        if step < 4:  # two rows a step enter the FIFO; a batch of 8 is there from step 4
            assert batch is None
    assert batch is not None and len(batch) == 8 and (batch.advantage > 1).all()
    assert (batch.old_logp == -0.5).all()  # the log-probs stored when they were sampled
    assert len(rollout.replay) <= 2 * cfg.batch_rows
