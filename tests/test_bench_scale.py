"""experiments/benchmarks/scale.py: the FLOPs / bytes formulas by hand, and a --quick run
(0.5B width, 1 layer) whose figures are all present, finite and positive."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from uecjax.models.presets import parameter_count, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "benchmarks", "scale.py")


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_flops_by_hand(scale):
    """tiny: V 256, H 64, I 128, 2 layers, 4 heads, 2 KV heads, head_dim 16; 2 rows x (3 + 5)."""
    cfg = preset("tiny")
    # per layer: H q + 2 H kv + q H + 3 H I = 64*64 + 2*64*32 + 64*64 + 3*64*128 = 36864
    assert scale.decoder_matmul_params(cfg) == 2 * 36864
    # T = 3 + 5 - 1 = 7 decoder inputs per row, R = 5 lm-head inputs per row
    dense = 6 * 73728 * (2 * 7)  # 6 N rows T
    attention = 12 * 2 * 7 * 64 * (2 * 7)  # 12 layers T q rows T
    head = 6 * 64 * 256 * (2 * 5)  # 6 H V rows R
    assert (dense, attention, head) == (6193152, 150528, 983040)
    for remat, hardware in (("none", 6193152 + 150528 + 1310720),
                            ("per_layer", 6193152 + 200704 + 1310720),
                            ("full", 8257536 + 200704 + 1310720)):
        flops = scale.train_flops(cfg, 2, 3, 5, remat)
        assert flops["model"] == 7326720, remat
        assert flops["hardware"] == hardware, remat
        assert (flops["dense"], flops["attention"], flops["lm_head"]) == (dense, attention, head)
    # k and v, 2 layers, 4 rows, 2 KV heads, 48 slots, head_dim 16, bfloat16
    assert scale.decode_kv_bytes(cfg, 4, 48, 2) == 2 * 2 * 4 * 2 * 48 * 16 * 2 == 49152


def test_spec_sheet(scale):
    assert scale.spec_sheet("NVIDIA H100 80GB HBM3")[1:] == (989e12, 3.35e12)
    assert scale.spec_sheet("NVIDIA H200")[1:] == (989e12, 4.8e12)
    assert scale.spec_sheet("NVIDIA A100-SXM4-80GB")[1:] == (312e12, 2.039e12)
    assert scale.spec_sheet("TPU v5 lite")[1:] == (197e12, 0.819e12)
    assert scale.spec_sheet("TPU v4")[1:] == (275e12, 1.2e12)
    for unknown in ("cpu", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA GeForce RTX 4090"):
        assert scale.spec_sheet(unknown) is None, unknown


POSITIVE = {
    "peak_matmul": ("best_s", "flops_per_s"),
    "memory_bandwidth": ("read_bytes_per_s", "copy_bytes_per_s", "bytes_per_s"),
    "shape": ("parameters", "real_parameters", "weight_bytes", "decoder_matmul_params"),
    "sampler": ("first_call_s", "compile_s", "end_to_end_s", "end_to_end_tokens_per_s",
                "decode_step_s", "decode_tokens_per_s", "prefill_s", "prefill_tokens_per_s",
                "weight_bytes_per_step", "kv_bytes_per_step", "bytes_per_step",
                "achieved_bytes_per_s", "roofline_frac"),
    "train_step": ("first_call_s", "compile_s", "step_s", "tokens_per_s", "model_flops_per_step",
                   "hardware_flops_per_step", "model_flops_per_s", "mfu", "hfu"),
}


def test_quick_run(scale):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)  # the suite's 8 simulated devices: the benchmark uses one
    result = subprocess.run([sys.executable, SCRIPT, "--quick", "--skip_dry_run",
                             "--shapes", "qwen2.5-0.5b"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    figures = {line["figure"]: line for line in lines}
    assert len(figures) == len(lines)  # one line per figure
    assert set(figures) == {"setup", *POSITIVE}
    assert all(line["bench"] == "scale" for line in lines)
    for figure, fields in POSITIVE.items():
        for field in fields:
            value = figures[figure][field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (figure, field, value)

    setup = figures["setup"]
    assert setup["platform"] == "cpu" and setup["spec"] is None
    assert setup["args"]["dtype"] == "float32" and setup["args"]["layers"] == 1
    real = preset("qwen2.5-0.5b")
    for figure in ("shape", "sampler", "train_step"):
        line = figures[figure]
        assert (line["shape"], line["layers"], line["real_layers"]) == ("qwen2.5-0.5b", 1, 24)
    shape = figures["shape"]
    assert shape["real_parameters"] == parameter_count(real) == 494032768
    assert shape["parameters"] == parameter_count(real.replace(num_hidden_layers=1))
    assert shape["weight_bytes"] == 4 * shape["parameters"]

    sampler = figures["sampler"]
    assert sampler["new_compiles_after_first"] == 0  # the short call shares the compile
    assert sampler["cache_slots"] == sampler["prompt_bucket"] + sampler["response_bucket"]
    assert sampler["bytes_per_step"] == sampler["weight_bytes_per_step"] + sampler["kv_bytes_per_step"]
    assert sampler["roofline_frac_spec"] is None

    train = figures["train_step"]
    flops = scale.train_flops(real.replace(num_hidden_layers=1), train["rows"], train["prompt"],
                              train["response"], train["remat"])
    assert train["model_flops_per_step"] == flops["model"]
    assert train["hardware_flops_per_step"] == flops["hardware"] > flops["model"]  # remat full
    assert train["loss_finite"] and train["mfu_spec"] is None
