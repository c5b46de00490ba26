"""Supervised warm-up: the loss against numpy, memorising a target, the demo's worked solutions
and its prepared (and reused) policy."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import uecjax.sft as sft
from uecjax.data.demo import demo_records
from uecjax.demo_model import SETTINGS_FILE, demo_solution, prepare_demo_policy, slip_offsets
from uecjax.models import Qwen2, TextConfig
from uecjax.optim import OptimConfig, make_optimizer
from uecjax.rewards.grader import RewardGrader
from uecjax.sampler import Sampler, SamplingParams
from uecjax.sft import make_sft_batch, sft_step, supervised_warmup
from uecjax.tokenizer import char_tokenizer, render_prompt

TINY = TextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_make_sft_batch_layout():
    b = make_sft_batch([([5, 6], [7, 8, 9]), ([4, 5, 6], [7])], prompt_len=3, target_len=3)
    np.testing.assert_array_equal(b.tokens, [[0, 5, 6, 7, 8, 9], [4, 5, 6, 7, 0, 0]])
    np.testing.assert_array_equal(b.attention_mask, [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b.positions, [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 3, 3]])
    np.testing.assert_array_equal(b.loss_mask, [[1, 1, 1], [1, 0, 0]])
    with pytest.raises(ValueError, match="example 0"):
        make_sft_batch([([1, 2, 3, 4], [5])], prompt_len=3, target_len=3)


def test_sft_step_loss_is_numpy_cross_entropy():
    model = Qwen2(TINY, rngs=nnx.Rngs(1))
    model.embed[...] = model.embed[...] * 5.0
    rng = np.random.default_rng(0)
    examples = [(rng.integers(1, 32, p).tolist(), rng.integers(1, 32, t).tolist())
                for p, t in [(3, 4), (5, 2), (2, 5)]]
    b = make_sft_batch(examples, prompt_len=5, target_len=5)
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2))
    new_params, _, metrics = sft_step(params, optimizer.init(params), b.tokens,
                                      b.attention_mask, b.positions, b.loss_mask,
                                      graphdef=graphdef, optimizer=optimizer)
    # Reference: full-sequence logits of each unpadded example, numpy cross-entropy.
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    nll = []
    for prompt, target in examples:
        seq = np.array([prompt + target], np.int32)
        logp = _log_softmax(np.asarray(forward(params, seq), np.float64))[0]
        nll += [-logp[len(prompt) - 1 + i, t] for i, t in enumerate(target)]
    assert float(metrics["loss"]) == pytest.approx(np.mean(nll), rel=1e-5, abs=1e-5)
    assert int(metrics["tokens"]) == 4 + 2 + 5
    changed = jax.tree.map(lambda a, c: bool(np.any(np.asarray(a) != np.asarray(c))),
                           params, new_params)
    assert any(jax.tree.leaves(changed))
    # Pure: the model itself is untouched by the step.
    np.testing.assert_array_equal(np.asarray(nnx.state(model)["embed"][...]),
                                  np.asarray(params["embed"][...]))


def test_warmup_memorises_a_repeated_example():
    model = Qwen2(TINY, rngs=nnx.Rngs(0))
    prompt, target = [3, 9, 4], [11, 12, 13, 14, 2]  # 2 = stop
    evals = []
    sampler = Sampler(model, pad_id=0)  # reads the parameters the warm-up writes in place

    def eval_fn():
        out = sampler([prompt], SamplingParams(max_new_tokens=6, temperature=0,
                                               stop_token_ids=(2,)))
        ok = out.response_tokens[0, :5].tolist() == target and out.response_mask[0].sum() == 5
        evals.append(ok)
        return float(ok)

    stats = supervised_warmup(model, None, [(prompt, target)] * 4, steps=60, batch_size=4,
                              learning_rate=1e-2, seed=0, log_every=20, eval_every=20,
                              eval_fn=eval_fn, target_accuracy=1.0, log=lambda s: None)
    assert stats["loss"] < 0.5 * stats["first_loss"]
    assert stats["final_eval"] == 1.0 and evals[-1]
    assert stats["steps"] <= 60
    assert stats["stopped_early"] == (stats["steps"] < 60)


def test_warmup_stops_at_once_when_already_good():
    model = Qwen2(TINY, rngs=nnx.Rngs(0))
    stats = supervised_warmup(model, None, [([1], [2])], steps=10, batch_size=2,
                              learning_rate=1e-2, eval_fn=lambda: 0.9, target_accuracy=0.5,
                              log=lambda s: None)
    assert stats["steps"] == 0 and stats["stopped_early"] and stats["evals"] == [(0, 0.9)]


@pytest.mark.parametrize("style", ["word", "expression"])
def test_demo_solution_grades_correct(style):
    records = demo_records("train", 25, seed=1, style=style) + demo_records("test", 25, seed=1,
                                                                             style=style)
    solutions = [demo_solution(r) for r in records]
    assert demo_solution(next(r for r in records if r.meta["expression"].count(" ") == 4
                              and "*" in r.meta["expression"])).startswith("<think>")
    with RewardGrader(num_workers=1) as grader:
        rewards = grader.grade(solutions, [r.answer for r in records])
    assert [r.accuracy for r in rewards] == [1.0] * 50
    assert [r.format for r in rewards] == [1.0] * 50


def test_demo_solution_steps():
    from uecjax.data.records import Record

    rec = Record(prompt="", answer="7", meta={"expression": "3 * 4 - 5"})
    assert demo_solution(rec) == "<think>3*4=12 12-5=7</think>\\boxed{7}"
    with pytest.raises(ValueError, match="answer"):
        demo_solution(Record(prompt="", answer="8", meta={"expression": "3 * 4 - 5"}))
    # A careless teacher's slip changes the boxed answer only, never the steps.
    assert demo_solution(rec, answer_offset=-2) == "<think>3*4=12 12-5=7</think>\\boxed{5}"


def test_slip_offsets():
    answers = [0, 1] + [10] * 4998
    offsets = slip_offsets(len(answers), 0.5, answers, seed=3)
    assert offsets == slip_offsets(len(answers), 0.5, answers, seed=3)  # seeded
    slipped = np.array(offsets) != 0
    assert abs(slipped.mean() - 0.5) < 3 * np.sqrt(0.25 / len(answers))
    assert set(offsets) == {-2, -1, 0, 1, 2}
    assert all(a + d >= 0 for a, d in zip(answers, offsets))  # answers stay counts
    assert slip_offsets(100, 0.0, [5] * 100, seed=0) == [0] * 100


def test_prepare_demo_policy_writes_and_reuses(tmp_path, monkeypatch):
    kw = dict(seed=0, model_overrides=dict(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1),
              num_train=64, style="expression", sft_steps=3, batch_size=8, num_val=4)
    model, tok, path = prepare_demo_policy(str(tmp_path), log=lambda s: None, **kw)
    assert path == os.path.join(str(tmp_path), "demo_init")
    for f in ("config.json", "model.safetensors", "tokenizer.json", SETTINGS_FILE):
        assert os.path.exists(os.path.join(path, f)), f
    saved = json.load(open(os.path.join(path, SETTINGS_FILE)))
    assert saved["settings"]["sft_steps"] == 3 and 0.0 <= saved["val_accuracy"] <= 1.0

    # The second call loads it: no training, same weights, a tokenizer that encodes the same.
    def no_training(*a, **k):
        raise AssertionError("retrained a policy that should have been reused")

    monkeypatch.setattr(sft, "supervised_warmup", no_training)
    messages = []
    model2, tok2, path2 = prepare_demo_policy(str(tmp_path), log=messages.append, **kw)
    assert path2 == path and any("reusing" in m for m in messages)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 nnx.state(model), nnx.state(model2))
    problem = "Kim has 9 pens.\nKim gets 2 more. How many pens now?"
    assert render_prompt(tok2, problem, template="plain") == \
        render_prompt(char_tokenizer(), problem, template="plain")
    assert tok2.decode(tok2.encode("<think>1 + 2</think>", add_special_tokens=False)) == \
        "<think>1 + 2</think>"
    # Other settings rebuild it.
    with pytest.raises(AssertionError, match="retrained"):
        prepare_demo_policy(str(tmp_path), log=lambda s: None, **{**kw, "sft_steps": 4})
