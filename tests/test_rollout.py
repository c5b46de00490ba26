"""Rollout logic (ALGORITHMS.md sections 2, 5, 7, 8) with a scripted sampler and grader."""

import concurrent.futures
import dataclasses
import itertools

import numpy as np
import pytest

from uecjax.batch import host_batch
from uecjax.objectives.methods import loss_config
from uecjax.rollout import Prompt, Rollout, RolloutConfig, rollout_config
from uecjax.sampler import SamplerOutput
from uecjax.parallel.hosts import Hosts


@dataclasses.dataclass
class Reward:
    reward: float
    accuracy: float


class ScriptedSampler:
    """Response j of prompt i (at temperature T) is correct when `success(i_id, j, T)`."""

    def __init__(self, success, R=6):
        self.success, self.R, self.calls = success, R, []

    def __call__(self, prompts, params, images=None, hosts=Hosts()):
        self.calls.append((len(prompts), params.n, params.temperature))
        prompts = prompts[hosts.block(len(prompts))]  # the rows of this share's prompts
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


def grade_format(texts, answers, choices):
    """Reward 0.1 * format + 0.9 * accuracy: "ok" right, "fmt" well formatted but wrong."""
    future = concurrent.futures.Future()
    future.set_result([Reward({"ok": 1.0, "fmt": 0.1}.get(t, 0.0), float(t == "ok")) for t in texts])
    return future


def score(params, rows, with_ref=True):
    n, R = rows.response_tokens.shape
    return np.full((n, R), -0.5, np.float32), np.full((n, R), 1.0, np.float32), None


def decode_with(text_of):
    """The rollout's decode (tokens [n, R], mask [n, R]) -> texts, from one row's ids -> text."""
    return lambda tokens, mask: [text_of([t for t, m in zip(row, mrow) if m])
                                 for row, mrow in zip(tokens, mask)]


def make(cfg, success, method="grpo", grade=grade, score=score, **loss_cfg):
    """success(i, j, T) -> 1 (correct), 0 (wrong), or 2 (wrong, well formatted: "fmt")."""
    prompts = (Prompt(ids=[i, 100 + i], answer="x") for i in itertools.count(1))
    sampler = ScriptedSampler(success)
    decode = decode_with(lambda ids: {2: "ok", 3: "fmt"}.get(ids[1], "no"))
    rollout = Rollout(cfg, loss_config(method, **loss_cfg), sampler=sampler, prompts=prompts,
                      grade=grade, score=score, decode=decode, stop_token_ids=())
    return rollout, sampler


def test_grpo_round_gives_one_batch_with_group_advantages():
    cfg = RolloutConfig(prompts_per_batch=4, group_size=4, max_prompt_len=4, max_new_tokens=6)
    rollout, sampler = make(cfg, lambda i, j, T: j < i % 4)  # prompt i: (i % 4) of 4 correct
    rows, stats = rollout.collect(None)
    assert len(rows) == 16 and sampler.calls == [(4, 4, 1.0)]
    r = rows.reward.reshape(4, 4)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rows.advantage, expected.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows.success_rate, np.repeat(r.mean(1), 4))
    assert rows.old_logp.shape == (16, 6) and (rows.old_logp == -0.5).all()
    assert stats["reward"] == pytest.approx(r.mean()) and stats["rollout/rounds"] == 1
    batch = host_batch(rows, tau_hard=0.0)
    assert batch.tokens.shape == (16, 10) and (batch.is_hard == (rows.success_rate <= 0)).all()


def explore_success(i, j, T):
    """Odd prompts: every regular sample fails (hard); at T' = 1.2 one of 8 succeeds.
    Even prompts: 2 of 4 succeed (informative)."""
    return (j == 3) if T > 1.0 else (i % 2 == 0 and j < 2)


def test_uec_explores_hard_prompts_and_keeps_rare_successes():
    cfg = rollout_config("uec", prompts_per_batch=2, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore_samples=8, explore_temperature=1.2,
                         retain_gated=False)
    rollout, sampler = make(cfg, explore_success, method="uec")
    rows, stats = rollout.collect(None)
    assert len(rows) == 8
    assert (8 / 1, 8, 1.2) not in sampler.calls and (1, 8, 1.2) in sampler.calls
    # retain_gated=False: regular rows of hard prompts (A = 0) are dropped; the exploration
    # success (A' > 1) kept.
    explored = rows.explore
    assert explored.any() and (rows.accuracy[explored] == 1).all()
    assert (rows.advantage[explored] > 1).all() and (rows.success_rate[explored] == 0).all()
    assert (np.abs(rows.advantage[~explored]) > 0.05).all()
    assert stats["explore/prompts"] >= 1 and stats["explore/kept"] >= 1


def test_gated_regular_rows_of_hard_prompts_stay():
    """With the section-6 gate on, the A = 0 rows of a hard prompt (w_q = 1) stay in the
    batch; those of a prompt every sample solves (w_q = 0) do not. Without the gate, or with
    retain_gated=False, retention drops both."""
    cfg = rollout_config("uec", prompts_per_batch=3, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore_samples=8)
    def success(i, j, T):  # prompts 1, 2, 3, ...: hard, mixed, solved, hard, ...
        return j == 3 if T > 1.0 else {0: True, 1: False, 2: j < 2}[i % 3]

    rollout, _ = make(cfg, success, method="uec")
    rows, _ = rollout.collect(None)
    first = rows.select(slice(0, 8))  # round 1's kept regular rows come first, prompt order
    np.testing.assert_array_equal(first.response_tokens[:, 0], [1] * 4 + [2] * 4)
    hard = first.success_rate == 0
    assert hard.sum() == 4 and (first.advantage[hard] == 0).all() and not first.explore.any()
    # The hard prompt's exploration success is in the buffer too (kept |A'| > 1).
    assert rows.explore.any() or rollout.buffer.rows.explore.any()
    assert not (rows.success_rate == 1).any()  # the solved prompt's rows are gone (w_q = 0)
    for off in (dict(retain_gated=False), None):
        cfg_off = dataclasses.replace(cfg, **off) if off else cfg
        rollout, _ = make(cfg_off, success, method="uec", **({} if off else dict(explore=False)))
        rows, _ = rollout.collect(None)
        assert (np.abs(rows.advantage[~rows.explore]) > 0.05).all()


def test_gated_rows_pass_dynamic_sampling_too():
    """DAPO's filter with the gate on: the all-fail group stays (w_q > 0), the solved one not."""
    cfg = RolloutConfig(prompts_per_batch=2, group_size=2, max_prompt_len=4, max_new_tokens=6)
    success = lambda i, j, T: i % 2 == 0  # noqa: E731  odd prompts fail, even ones are solved
    rollout, _ = make(cfg, success, method="dapo", explore=True)
    rows, stats = rollout.collect(None)
    assert (rows.success_rate == 0).all() and stats["rollout/rounds"] == 2
    rollout, _ = make(dataclasses.replace(cfg, retain_gated=False, max_rounds=2), success,
                      method="dapo", explore=True)
    assert rollout.collect(None)[1]["rollout/padded_rows"] == 4


def test_hard_prompts_and_dynamic_sampling_judge_accuracy():
    """A well-formatted wrong response has reward 0.1: on accuracy its prompt is still hard
    (explored) and its group all-equal (filtered); on "reward" neither."""
    # Odd prompts: 2 formatted wrong, 2 unformatted wrong; even prompts: 2 of 4 right.
    success = lambda i, j, T: (2 if j < 2 else 0) if i % 2 else int(j < 2)  # noqa: E731
    kw = dict(prompts_per_batch=2, group_size=4, max_prompt_len=4, max_new_tokens=6,
              explore_samples=4, max_rounds=1)
    for explore_on, explored in (("accuracy", 1), ("reward", 0)):
        rollout, _ = make(rollout_config("uec", explore_on=explore_on, **kw), success, method="uec",
                          grade=grade_format)
        assert rollout.collect(None)[1]["explore/prompts"] == explored
    for on, kept in (("accuracy", 4), ("reward", 8)):
        rollout, _ = make(RolloutConfig(dynamic_sampling_on=on, **kw), success, method="dapo",
                          grade=grade_format)
        assert rollout.collect(None)[1]["rollout/kept_fraction"] == kept / 8
    assert RolloutConfig().explore_on == RolloutConfig().dynamic_sampling_on == "accuracy"
    with pytest.raises(ValueError, match="dynamic_sampling_on='acc'"):
        RolloutConfig(dynamic_sampling_on="acc")


class CallScore:
    """score with recognisable values: entropy 10 * call + response token 1 (1 wrong, 2
    right); old_logp -call - 1; reference log-probs -0.25 (None when with_ref is False)."""

    def __init__(self, with_ref=False):
        self.calls, self.with_ref = 0, with_ref

    def __call__(self, params, rows, with_ref=True):
        response_tokens = rows.response_tokens
        n, R = response_tokens.shape
        c, self.calls = self.calls, self.calls + 1
        self.last_with_ref, self.last_params = with_ref, params
        entropy = np.repeat(10.0 * c + response_tokens[:, 1:2], R, axis=1).astype(np.float32)
        ref = np.full((n, R), -0.25, np.float32) if self.with_ref else None
        return np.full((n, R), -1.0 - c, np.float32), entropy, ref


def test_prompt_metrics_and_regular_entropy_before_selection():
    """Hard fraction (p_q <= tau_hard), mean gate weight and the regular rows' token-mean
    entropy are over every regular prompt / row sampled, not over the kept rows; the
    exploration rows' entropy does not count."""
    cfg = rollout_config("uec", prompts_per_batch=2, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore_samples=8)
    scorer = CallScore()
    rollout, sampler = make(cfg, explore_success, method="uec", score=scorer, tau_hard=0.5)
    _, stats = rollout.collect(None)
    assert stats["rollout/rounds"] == 1 and len(sampler.calls) == 2  # regular + exploration
    # Prompt 1: p_q = 0 (w = 1); prompt 2: p_q = 0.5 (w = 0, hard for tau_hard = 0.5).
    assert stats["rollout/hard_prompt_fraction"] == 1.0
    assert stats["rollout/gate_mean"] == pytest.approx(0.5)
    # Regular call (call 0): 6 rows wrong (entropy 1), 2 right (entropy 2), 6 tokens each.
    assert stats["rollout/regular_entropy"] == pytest.approx((6 * 1 + 2 * 2) / 8)
    assert stats["rollout/regular_tokens"] == 8 * 6
    rollout, _ = make(RolloutConfig(prompts_per_batch=2, group_size=4, max_prompt_len=4,
                                    max_new_tokens=6), explore_success)
    assert "rollout/gate_mean" not in rollout.collect(None)[1]  # no gate: no gate metric


def test_dapo_dynamic_sampling_refills_from_further_prompts():
    cfg = RolloutConfig(prompts_per_batch=2, group_size=2, max_prompt_len=4, max_new_tokens=6)
    # Only prompts divisible by 3 have mixed outcomes; the others are all-fail groups.
    rollout, sampler = make(cfg, lambda i, j, T: i % 3 == 0 and j == 0, method="dapo")
    rows, stats = rollout.collect(None)
    assert len(rows) == 4 and (rows.advantage != 0).all()
    prompts_used = {int(t) for t in rows.response_tokens[:, 0]}
    assert all(i % 3 == 0 for i in prompts_used)
    assert stats["rollout/rounds"] >= 2 and stats["rollout/padded_rows"] == 0


def test_batch_is_padded_with_weightless_rows_after_max_rounds():
    cfg = RolloutConfig(prompts_per_batch=2, group_size=2, max_prompt_len=4, max_new_tokens=6,
                        max_rounds=2)
    rollout, _ = make(cfg, lambda i, j, T: False, method="dapo")  # nothing is informative
    rows, stats = rollout.collect(None)
    assert len(rows) == 4 and stats["rollout/padded_rows"] == 4
    assert rows.response_mask.sum() == 0 and (rows.advantage == 0).all()


def test_replay_fifo_and_schedule():
    cfg = rollout_config("uec_code", prompts_per_batch=2, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore=False, retention=False, replay_every=2)
    rollout, _ = make(cfg, lambda i, j, T: j == 0)  # one success of four: A = 1.5 > A_0
    rng = np.random.default_rng(0)
    for step in range(1, 5):
        rows, _ = rollout.collect(None)
        rollout.remember_for_replay(rows)
        batch = rollout.replay_batch(step, rng, params=None)
        if step < 4:  # two rows a step enter the FIFO; a batch of 8 is there from step 4
            assert batch is None
    assert batch is not None and len(batch) == 8 and (batch.advantage > 1).all()
    assert (batch.old_logp == -0.5).all()  # the log-probs stored when they were sampled
    assert len(rollout.replay) <= 2 * cfg.batch_rows


def test_replay_recompute_rescores_the_drawn_rows():
    """replay_recompute: the drawn rows' old log-probs and entropies come from a new score
    call (the trainer's current parameters); the reference log-probs stay as stored."""
    cfg = rollout_config("uec_code", prompts_per_batch=2, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore=False, retention=False, replay_every=1,
                         replay_recompute=True)
    scorer = CallScore(with_ref=True)
    rollout, _ = make(cfg, lambda i, j, T: j == 0, score=scorer, beta=0.01)
    rng = np.random.default_rng(0)
    for step in range(1, 5):
        rows, _ = rollout.collect(f"params@{step}")
        assert scorer.last_params == f"params@{step}"  # the rows are scored with the given params
        rollout.remember_for_replay(rows)
        calls = scorer.calls
        batch = rollout.replay_batch(step, rng, params=f"params@{step}")
        assert scorer.calls == calls + (batch is not None)  # rescored only when drawn
    assert batch is not None and len(batch) == 8
    assert (batch.old_logp == -1.0 - calls).all()  # the newest call's values
    np.testing.assert_array_equal(batch.old_entropy, 10.0 * calls + batch.response_tokens[:, 1:2]
                                  * np.ones((1, 6)))
    assert (batch.ref_logp == -0.25).all() and scorer.last_with_ref is False  # no reference pass
    assert scorer.last_params == "params@4"
    stored = rollout.replay.rows  # the FIFO keeps the values of when the rows were sampled
    assert (stored.old_logp > -1.0 - calls).all()
