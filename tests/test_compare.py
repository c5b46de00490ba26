"""experiments/compare.py: methods x seeds on a shrunken demo, table and plots."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, ROOT)

import compare  # noqa: E402

# The demo config, shrunk: a 1-layer policy warmed up for a few steps, 2 prompts x 2 responses.
TINY = ["demo.sft_steps=4", "demo.num_train=16", "demo.num_val=0", "demo.batch_size=4",
        'demo.model_overrides={"hidden_size": 32, "intermediate_size": 64, '
        '"num_hidden_layers": 1}',
        "demo_data.num_train=32", "rollout.prompts_per_batch=2", "rollout.group_size=2",
        "rollout.explore_samples=2", "rollout.max_rounds=1", "rollout.max_new_tokens=8",
        "eval.n=2", "eval.max_new_tokens=8", "eval.batch_prompts=4", "mesh.num_devices=1"]


def test_run_config_applies_variant_and_overrides():
    cfg = compare.run_config("uec-no_stabilizer", 3, 7, 2, 16, ["optim.learning_rate=1",
                                                              "rollout.explore_on=accuracy"])
    assert (cfg.method, cfg.loss.stabilizer, cfg.seed, cfg.train.steps) == ("uec", False, 3, 7)
    assert cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.rollout.explore_on == "accuracy"
    assert compare.run_config("uec-no_rollout_explore", 0, 1, 1, 1).rollout.explore is False
    with pytest.raises(Exception, match="unknown variant"):
        compare.run_config("nope", 0, 1, 1, 1)


def test_compare_writes_table_and_plots(tmp_path):
    out = str(tmp_path / "results")
    table = compare.compare(["grpo", "uec"], [0, 1], steps=2, eval_every=1, eval_prompts=4,
                            out=out, overrides=TINY, log=lambda *_: None)
    assert sorted(table) == ["grpo", "uec"]
    for variant in ("grpo", "uec"):
        finals, entropies = [], []
        for seed in (0, 1):
            run = os.path.join(out, "runs", f"{variant}-s{seed}")
            curves = compare.read_curves(os.path.join(run, "metrics.jsonl"))
            assert list(curves["eval/pass@1"][0]) == [0, 1, 2]  # start, every step, end
            finals.append(curves["eval/pass@1"][1][-1])
            entropies.append(np.mean(curves["entropy"][1][-5:]))
        row = table[variant]
        assert row["final_pass@1"]["mean"] == pytest.approx(np.mean(finals))
        assert row["final_pass@1"]["min"] == pytest.approx(min(finals))
        assert row["final_entropy"]["mean"] == pytest.approx(np.mean(entropies))
        assert row["final_entropy"]["n"] == 2
    # Every run starts from the same warmed-up policy.
    assert table["grpo"]["initial_pass@1"]["min"] == table["uec"]["initial_pass@1"]["max"]
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["table"]["uec"]["final_pass@1"]["n"] == 2
    with open(os.path.join(out, "results.md")) as f:
        md = f.read()
    assert "| grpo |" in md and "| uec |" in md
    for name in ("entropy.png", "reward.png", "pass_at_k.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # A finished run is not run again: a second call only re-reads the summaries.
    stamp = os.path.getmtime(os.path.join(out, "runs", "uec-s1", "metrics.jsonl"))
    again = compare.compare(["uec"], [1], steps=2, eval_every=1, eval_prompts=4, out=out,
                            overrides=TINY, log=lambda *_: None)
    assert os.path.getmtime(os.path.join(out, "runs", "uec-s1", "metrics.jsonl")) == stamp
    assert again["uec"]["final_pass@1"]["mean"] == pytest.approx(
        compare.read_curves(os.path.join(out, "runs", "uec-s1", "metrics.jsonl"))["eval/pass@1"][1][-1])
