"""experiments/benchmarks/lora.py --quick (toy presets, rank 4): every figure is present, LoRA
trains fewer parameters than full fine-tuning and keeps smaller trained-parameter, optimizer and
reference bytes, the unmerged and merged samplers agree on every greedy token, and the
dry runs' frozen base is counted. No timing assertions."""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "lora.py")


def positive(value):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def test_quick_run(tmp_path):
    out = tmp_path / "lora.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # one device for the timings; the dry-run child sets its own
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines  # --out
    assert all(line["bench"] == "lora" for line in lines)
    assert not [line for line in lines if "error" in line], result.stdout[-3000:]
    by_figure = {}
    for line in lines:
        by_figure.setdefault(line["figure"], []).append(line)
    assert set(by_figure) == {"setup", "train_step", "sampler", "dry_run", "cpu_bf16_temp"}

    full, lora = by_figure["train_step"]
    assert (full["mode"], lora["mode"]) == ("full", "lora")
    assert full["trained_parameters"] == full["parameters"]
    assert 0 < lora["trained_parameters"] < full["trained_parameters"]
    for line in (full, lora):
        assert line["loss_finite"] and positive(line["tokens_per_s"]) and positive(line["step_s"])
    assert positive(lora["lora_over_full"])

    kinds = {line["kind"]: line for line in by_figure["sampler"]}
    assert set(kinds) == {"greedy", "sampling", "merge"}
    assert kinds["greedy"]["tokens_agree_frac"] == 1.0  # unmerged == merged, token for token
    for kind in ("greedy", "sampling"):
        assert positive(kinds[kind]["unmerged_over_merged"])
    assert positive(kinds["merge"]["merge_s"]) and positive(kinds["merge"]["merged_weight_bytes"])

    dry = {(line["devices"], line["mode"]): line for line in by_figure["dry_run"]}
    assert set(dry) == {(8, "full"), (8, "lora")}  # --quick: the sharded case only
    for devices in (8,):
        f, l = dry[devices, "full"]["per_device_bytes"], dry[devices, "lora"]["per_device_bytes"]
        assert f["frozen_params"] == 0 and l["frozen_params"] > 0
        # The base is the full run's trained parameters, frozen: the same bytes per device.
        assert l["frozen_params"] == f["params"]
        for key in ("params", "optimizer_state", "reference_params"):
            assert 0 < l[key] < f[key], key
        assert dry[devices, "lora"]["lora"]["params"] == lora["trained_parameters"]
        assert positive(dry[devices, "lora"]["lora_over_full_total"])
    probe, = by_figure["cpu_bf16_temp"]
    assert positive(probe["float32_temp_bytes"]) and positive(probe["bfloat16_temp_bytes"])
