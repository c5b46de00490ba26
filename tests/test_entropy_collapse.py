"""experiments/entropy_collapse.py: the law fit, the intervals, and a shrunken end-to-end run."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
sys.path.insert(0, ROOT)

import entropy_collapse as ec  # noqa: E402


def test_entropy_law_fit_recovers_a_and_b():
    h = np.linspace(0.1, 1.2, 40)
    r = -0.2 * np.exp(h) + 0.7
    law = ec.fit_entropy_law(h, r)
    assert abs(law["a"] - 0.2) < 1e-9 and abs(law["b"] - 0.7) < 1e-9
    assert law["rmse"] < 1e-9 and abs(law["ceiling"] - 0.5) < 1e-9


def test_bootstrap_interval_brackets_the_mean_and_is_a_point_for_equal_seeds():
    mean, lo, hi = ec.bootstrap_ci([0.1, 0.2, 0.3, 0.4, 0.5])
    assert lo < mean < hi and abs(mean - 0.3) < 1e-12
    assert ec.bootstrap_ci([0.25, 0.25]) == (0.25, 0.25, 0.25)


def test_shrunken_run_writes_results_tables_and_plots(tmp_path):
    out = str(tmp_path / "entropy")
    argv = ["entropy_collapse", "--methods=grpo,uec", "--seeds=2", "--steps=2", "--eval_every=1",
            "--eval_samples=4", "--eval_per_level=4", "--host_steps=0", "--sft_steps=20",
            f"--out={out}"]
    ec.FLAGS.unparse_flags()
    ec.FLAGS(argv)
    try:
        ec.main([])
        for name in ("results.md", "results.json", "curves.png", "pass_at_k.png", "entropy_law.png",
                     "runs/grpo.npz", "runs/uec.npz"):
            assert os.path.getsize(os.path.join(out, name)) > 0, name
        result = json.load(open(os.path.join(out, "results.json")))
        assert sorted(result["variants"]) == ["grpo", "uec"]
        final = result["variants"]["uec"]["final"]
        for key in ("pass@1", "pass@4", "entropy", "hard_solved"):
            mean, lo, hi = final[key]
            assert lo <= mean <= hi
        assert 0.0 <= result["warmup"]["sampled_pass@1"] <= 1.0
        runs = np.load(os.path.join(out, "runs", "uec.npz"))
        assert runs["eval_correct"].shape == (2, 3, 8)  # seeds, 1 + steps / eval_every, problems
        assert (runs["eval_correct"] <= 4).all()
        table = open(os.path.join(out, "results.md")).read()
        assert "| uec |" in table
        assert any(v in table for v in ("no difference", "higher", "lower"))
        # a second call reuses the finished variants instead of running them again
        stamp = os.path.getmtime(os.path.join(out, "runs", "uec.npz"))
        ec.main([])
        assert os.path.getmtime(os.path.join(out, "runs", "uec.npz")) == stamp
    finally:
        ec.FLAGS.unparse_flags()
