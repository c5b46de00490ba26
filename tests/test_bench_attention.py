"""experiments/benchmarks/attention.py --quick ("tiny" shape, T 256 and 512, key block 128): every
figure is present, its ratios are positive, and the chunked layer keeps fewer temporaries than
the reference at the longest length. No timing assertions."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "attention.py")

POSITIVE = {
    "memory": ("temp_bytes", "argument_bytes", "output_bytes", "attention_temp_bytes"),
    "memory_floor": ("temp_bytes", "floor_ratio_to_xla"),
    "time": ("layer_step_s", "attention_step_s", "median_layer_step_s", "median_attention_step_s",
             "layer_first_run_s", "layer_compile_s"),
}
CHUNKED_RATIOS = {"memory": ("temp_ratio_to_xla", "attention_temp_ratio_to_xla"),
                  "time": ("layer_ratio_to_xla", "attention_ratio_to_xla")}


def positive(value):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def test_quick_run(tmp_path):
    out = tmp_path / "attention.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    # Not the suite's 8 simulated devices (the benchmark uses one); LLVM's optimisations off:
    # about half the compile time of the run's 10 programs, the same buffer assignment (the
    # memory figures are equal byte for byte), and nothing here asserts on time.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines  # --out
    assert all(line["bench"] == "attention" for line in lines)
    by_figure = {}
    for line in lines:
        by_figure.setdefault(line["figure"], []).append(line)
    assert set(by_figure) == {"setup", "memory", "memory_floor", "memory_goal", "time"}

    setup, = by_figure["setup"]
    assert setup["platform"] == "cpu" and setup["shape"] == "tiny"
    lengths = [int(t) for t in setup["args"]["lengths"].split(",")]
    time_lengths = [int(t) for t in setup["args"]["time_lengths"].split(",")]
    assert len(by_figure["memory"]) == 2 * len(lengths)
    assert len(by_figure["memory_floor"]) == len(lengths)
    assert len(by_figure["time"]) == 2 * len(time_lengths)

    for figure, fields in POSITIVE.items():
        for line in by_figure[figure]:
            for field in fields:
                assert positive(line[field]), (figure, field, line[field])
            if line.get("impl") == "chunked":
                for field in CHUNKED_RATIOS[figure]:
                    assert positive(line[field]), (figure, field, line[field])
            if figure != "memory_floor":
                assert line["auto"] in ("xla", "chunked") and line["impl"] in ("xla", "chunked")
    for line in by_figure["time"]:
        if line["impl"] == "chunked":
            assert line["faster"] in ("xla", "chunked") and isinstance(line["auto_is_faster"], bool)
            assert line["attention_faster"] in ("xla", "chunked")

    memory = {(line["seq"], line["impl"]): line for line in by_figure["memory"]}
    longest = max(lengths)
    chunked, reference = memory[longest, "chunked"], memory[longest, "xla"]
    assert chunked["temp_bytes"] < reference["temp_bytes"]
    assert chunked["attention_temp_bytes"] < reference["attention_temp_bytes"]
    assert math.isclose(chunked["temp_ratio_to_xla"], chunked["temp_bytes"] / reference["temp_bytes"],
                        rel_tol=1e-3)
    floor = {line["seq"]: line for line in by_figure["memory_floor"]}[longest]
    assert floor["temp_bytes"] < chunked["temp_bytes"]  # the layer without attention keeps less
    goal, = by_figure["memory_goal"]
    assert goal["seq"] == 8192 and goal["goal_met"] is None  # 8192 is not a quick length
