"""Evaluation: Pass@k bookkeeping against a hand computation, consistency on a tiny random model,
checkpoint loading errors and the CLI."""

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from uecjax.config import base_config
from uecjax.data.records import Record
from uecjax.evaluate import default_ks, evaluate
from uecjax.tokenizer import decode_responses
from uecjax.models import Qwen2, TextConfig, save_pretrained
from uecjax.rewards.grading import Reward, extract_boxed, format_reward
from uecjax.sampler import Sampler, SamplerOutput
from uecjax.tokenizer import char_tokenizer, render_prompt, stop_token_ids, load_tokenizer
from uecjax.models import CheckpointError
from uecjax.parallel.hosts import Hosts
from uecjax.parallel.mesh import make_mesh
from uecjax.setup import load_policy, make_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


class FakeGrader:
    """Exact boxed-answer match, the real format rule, w_f = 0.1; no worker processes."""

    def __init__(self, correct=None):
        self.correct = correct  # optional override: response -> bool
        self.calls = 0

    def grade_batch(self, responses, answers, choices=None):
        self.calls += 1
        out = []
        for text, gold in zip(responses, answers):
            acc = float(self.correct(text) if self.correct else extract_boxed(text) == gold)
            fmt = format_reward(text)
            out.append(Reward(0.1 * fmt + 0.9 * acc, acc, fmt, extract_boxed(text), "ok"))
        future = concurrent.futures.Future()
        future.set_result(out)
        return future


class StubSampler:
    """Replays fixed responses: greedy[prompt] and samples[prompt] (a list of n), by prompt text."""

    def __init__(self, tok, greedy, samples, width=24):
        self.tok, self.greedy, self.samples, self.width = tok, greedy, samples, width
        self.calls = []
        self.stop = stop_token_ids(tok)[0]

    def _key(self, ids):
        text = self.tok.decode(ids, skip_special_tokens=True)
        return next(k for k in self.greedy if k in text)

    def __call__(self, prompts, params, images=None, hosts=Hosts()):
        self.calls.append((len(prompts), params))
        texts = []
        for p in prompts[hosts.block(len(prompts))]:
            key = self._key(p)
            if params.temperature == 0:
                texts.append(self.greedy[key])
            else:
                assert len(self.samples[key]) == params.n
                texts.extend(self.samples[key])
        rows = len(texts)
        T = params.max_new_tokens
        tokens = np.zeros((rows, T), np.int32)
        mask = np.zeros((rows, T), np.int32)
        truncated = np.zeros(rows, bool)
        for i, text in enumerate(texts):
            ids = self.tok.encode(text, add_special_tokens=False) + [self.stop]
            if len(ids) > T:
                ids, truncated[i] = ids[:T], True
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = 1
        return SamplerOutput(np.zeros((rows, 1), np.int32), np.ones((rows, 1), np.int32),
                             tokens, mask, np.zeros((rows, T), np.float32), truncated)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]


def test_matches_hand_computation_on_stub_sampler(tok):
    good, bad = "<think>x</think>\\boxed{%s}", "no box %s"
    records = [Record(prompt=f"problem {q}", answer=str(q)) for q in "ABC"]
    greedy = {"problem A": good % "A", "problem B": good % "x", "problem C": bad % "C"}
    samples = {  # correct samples: A 0 of 4, B 1 of 4, C 4 of 4 (C once without format)
        "problem A": [good % "z", bad % "A", good % "y", good % "w"],
        "problem B": [good % "B", good % "q", bad % "B", good % "r"],
        "problem C": [good % "C", good % "C", "\\boxed{C}", good % "C"],
    }
    sampler = StubSampler(tok, greedy, samples)
    grader = FakeGrader()
    m = evaluate(sampler, tok, records, grader, n=4, max_new_tokens=24, batch_prompts=2,
                 prompt_template="plain", progress=False)
    # Pass@k per prompt: 1 - C(n - c, k) / C(n, k) with n = 4, c = 0, 1, 4.
    assert m["pass@1"] == pytest.approx((0 + 1 / 4 + 1) / 3)
    assert m["pass@2"] == pytest.approx((0 + (1 - 3 / 6) + 1) / 3)
    assert m["pass@4"] == pytest.approx((0 + 1 + 1) / 3)
    assert set(k for k in m if k.startswith("pass@")) == {"pass@1", "pass@2", "pass@4"}
    assert m["accuracy"] == pytest.approx(5 / 12)
    assert m["greedy_pass@1"] == pytest.approx(1 / 3)
    assert m["format"] == pytest.approx(9 / 12)
    assert m["greedy_format"] == pytest.approx(2 / 3)
    assert m["reward"] == pytest.approx(0.1 * 9 / 12 + 0.9 * 5 / 12)
    all_samples = [t for q in "ABC" for t in samples[f"problem {q}"]]
    lengths = [len(tok.encode(t, add_special_tokens=False)) + 1 for t in all_samples]
    assert m["response_length"] == pytest.approx(np.mean(lengths))
    assert m["truncated"] == 0.0
    assert m["num_prompts"] == 3 and m["n"] == 4
    # 2 batches (2 + 1 prompts), each a greedy call (n = 1, T = 0) and a sampled one.
    assert [c[0] for c in sampler.calls] == [2, 2, 1, 1]
    assert [(c[1].n, c[1].temperature) for c in sampler.calls] == [(1, 0.0), (4, 1.0)] * 2
    assert sampler.calls[1][1].seed != sampler.calls[3][1].seed
    assert grader.calls == 2
    # Custom ks; greedy off.
    m2 = evaluate(sampler, tok, records, grader, n=4, max_new_tokens=24, ks=[3],
                  prompt_template="plain", progress=False, greedy=False)
    assert "greedy_pass@1" not in m2 and set(k for k in m2 if k.startswith("pass@")) == {"pass@3"}
    assert m2["pass@3"] == pytest.approx((0 + (1 - 1 / 4) + 1) / 3)  # c = 1: 1 - C(3,3)/C(4,3)
    with pytest.raises(ValueError, match="ks"):
        evaluate(sampler, tok, records, grader, n=4, max_new_tokens=24, ks=[8],
                 prompt_template="plain", progress=False)


def test_row_shares_grade_their_own_prompts_and_agree(tok):
    """Two row shares (threads standing in for processes, all-gathering through a barrier):
    each grades only its block of every batch (3 prompts a batch: blocks of 2, the second
    padded), and both return the one-share metrics."""
    import threading

    from test_row_share import BarrierExchange

    good = "<think>x</think>\\boxed{%s}"
    names = "ABCDE"
    records = [Record(prompt=f"problem {q}", answer=str(q)) for q in names]
    greedy = {f"problem {q}": good % (q if q in "AC" else "x") for q in names}
    samples = {f"problem {q}": [good % q] * i + [good % "x"] * (2 - i)
               for q, i in zip(names, (0, 1, 2, 1, 0))}
    kw = dict(n=2, max_new_tokens=24, batch_prompts=3, prompt_template="plain", progress=False)
    whole = evaluate(StubSampler(tok, greedy, samples), tok, records, FakeGrader(), **kw)
    exchange, out, graded = BarrierExchange(2), [None, None], [0, 0]

    def run(b):
        grader = FakeGrader()
        grade = grader.grade_batch
        grader.grade_batch = lambda r, a, c=None: (graded.__setitem__(b, graded[b] + len(r)), grade(r, a, c))[1]
        out[b] = evaluate(StubSampler(tok, greedy, samples), tok, records, grader,
                          hosts=Hosts(b, 2, (0, 1), exchange.of(b)), **kw)

    threads = [threading.Thread(target=run, args=(b,)) for b in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for m in out:
        assert {k: v for k, v in m.items() if k != "seconds"} == \
            pytest.approx({k: v for k, v in whole.items() if k != "seconds"})
    # Batches (A, B, C) and (D, E): share 0 grades A, B, D; share 1 grades C, E; 3 rows each.
    assert graded == [3 * 3, 2 * 3]
    assert whole["pass@1"] == pytest.approx(4 / 10) and whole["greedy_pass@1"] == pytest.approx(2 / 5)


def test_decode_strips_only_the_final_stop_token(tok):
    stop = stop_token_ids(tok)
    ids = tok.encode("<think>1+1=2</think>\\boxed{2}", add_special_tokens=False)
    W = len(ids) + 3
    tokens = np.array([ids + [stop[0], 0, 0], ids[:3] + [0] * (W - 3)], np.int32)
    mask = np.array([[1] * (len(ids) + 1) + [0, 0], [1] * 3 + [0] * (W - 3)], np.int32)
    assert decode_responses(tok, tokens, mask, stop) == ["<think>1+1=2</think>\\boxed{2}",
                                                        "<think>1+"]


def test_consistent_on_tiny_random_model(tok):
    cfg = TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 4.0  # peaked but varied distributions
    sampler = Sampler(model, pad_id=tok.pad_token_id)
    records = [Record(prompt=f"{a} + {a} = ?", answer=str(2 * a)) for a in range(4)]
    # "Correct" by a parity of the text: a mix of 0s and 1s from a random model.
    grader = FakeGrader(correct=lambda text: sum(map(ord, text)) % 2 == 0)
    kw = dict(n=8, max_new_tokens=8, batch_prompts=2, prompt_template="plain", progress=False)
    m = evaluate(sampler, tok, records, grader, seed=3, **kw)
    assert m["pass@1"] == pytest.approx(m["accuracy"])
    ks = [m[f"pass@{k}"] for k in (1, 2, 4, 8)]
    assert all(a <= b + 1e-12 for a, b in zip(ks, ks[1:]))
    assert 0.0 < m["pass@1"] < 1.0
    assert m["greedy_pass@1"] in [i / 4 for i in range(5)]  # one greedy response per prompt
    assert 1 <= m["response_length"] <= 8 and 0 <= m["truncated"] <= 1
    again = evaluate(sampler, tok, records, grader, seed=3, **kw)
    assert {k: v for k, v in again.items() if k != "seconds"} == \
        {k: v for k, v in m.items() if k != "seconds"}
    other = evaluate(sampler, tok, records, grader, seed=4, **kw)
    assert other["greedy_pass@1"] == m["greedy_pass@1"]
    assert other["greedy_response_length"] == m["greedy_response_length"]


def _write_tiny_checkpoint(path, tok):
    cfg = TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                     tie_word_embeddings=True)
    save_pretrained(Qwen2(cfg, rngs=nnx.Rngs(0)), str(path))
    tok.save_pretrained(str(path))


def test_checkpoint_tokenizer_round_trip(tmp_path, tok):
    _write_tiny_checkpoint(tmp_path / "ckpt", tok)
    loaded = load_tokenizer(str(tmp_path / "ckpt"))
    text = "Kim has 9 pens.\nKim gets 2 more."
    assert render_prompt(loaded, text, template="plain") == \
        render_prompt(tok, text, template="plain")
    assert stop_token_ids(loaded) == stop_token_ids(tok)
    ids = loaded.encode("<think>a b</think>\\boxed{7}", add_special_tokens=False)
    assert loaded.decode(ids, skip_special_tokens=False) == "<think>a b</think>\\boxed{7}"


def test_eval_records_follow_the_training_configs():

    from uecjax.data.demo import demo_records

    c = base_config()
    c.seed, c.data.kind, c.eval.num_prompts = 3, "demo", 5
    # The demo's problems follow demo_data.seed, not the run seed (runs with different seeds
    # are evaluated on the same held-out problems).
    c.demo_data.update(num_train=10, num_eval=12, levels=(1, 2), style="expression", seed=7)
    expected = demo_records("test", 12, seed=7, levels=(1, 2), style="expression")
    assert make_records(c, "test", train=False) == expected[:5]
    assert make_records(c, "test", train=False, num_prompts=0) == expected
    assert expected != demo_records("test", 12, seed=3, levels=(1, 2), style="expression")
    c.data.kind = "csv"
    with pytest.raises(ValueError, match="data.kind"):
        make_records(c, "test", train=False)


def test_missing_checkpoint_errors(tmp_path):
    c, mesh = base_config(), make_mesh()
    with pytest.raises(CheckpointError, match="--checkpoint=.*nope: directory not found"):
        load_policy(c, mesh, checkpoint=str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_policy(c, mesh)
    c.data.kind = "demo"  # an embedded task prepares its policy only for a training run
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_policy(c, mesh)
    (tmp_path / "orbax").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_policy(c, mesh, checkpoint=str(tmp_path / "orbax"))


def test_cli_prints_json_metrics(tmp_path, tok):
    _write_tiny_checkpoint(tmp_path / "ckpt", tok)
    config = tmp_path / "cfg.py"
    config.write_text(textwrap.dedent("""
        from uecjax.config import base_config

        def get_config():
            c = base_config()
            c.data.kind = "demo"
            c.demo_data.update(num_train=8, num_eval=3, levels=(1, 2), style="expression")
            c.eval.n, c.eval.max_new_tokens, c.eval.batch_prompts, c.eval.num_prompts = 2, 4, 4, 3
            c.prompt.template = "plain"
            c.reward.num_workers = 1
            return c
    """))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "uecjax.evaluate", f"--config={config}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    out = run(f"--checkpoint={tmp_path / 'ckpt'}", "--n=2", f"--output={tmp_path / 'm.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["num_prompts"] == 3 and metrics["n"] == 2 and metrics["split"] == "test"
    assert {"greedy_pass@1", "pass@1", "pass@2", "reward", "format"} <= set(metrics)
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    missing = run(f"--checkpoint={tmp_path / 'missing'}")
    assert missing.returncode != 0 and "directory not found" in missing.stderr
