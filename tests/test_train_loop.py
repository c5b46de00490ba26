"""End to end: `uecjax.train` on a tiny random policy — every method runs, resume equals the
uninterrupted run, SIGTERM saves and exits, bad input gives the documented messages."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from uecjax import checkpoint as ckpt
from loop_helpers import tiny_config, write_policy
from uecjax.config import ConfigValueError
from uecjax.objectives.methods import METHODS
from uecjax.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """A tiny random Qwen2 over the demo's character vocabulary, with its tokenizer."""
    return write_policy(tmp_path_factory.mktemp("policy"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_and_writes_logs_and_checkpoint(policy_dir, tmp_path, method):
    summary = train(tiny_config(policy_dir, method), str(tmp_path), log_console=None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward", "entropy", "pass@1", "tokens_per_s", "grad_norm", "eval/pass@1"):
        assert any(key in r for r in rows), key
    assert os.listdir(tmp_path / "tensorboard")
    assert ckpt.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).latest_step() == 2
    assert summary["step"] == 2 and "final_pass@1" in summary


def test_resume_equals_uninterrupted(policy_dir, tmp_path):
    def cfg(steps):
        c = tiny_config(policy_dir, "uec", steps=steps)
        c.train.export_hf = True
        return c

    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(4), str(full), log_console=None)
    train(cfg(2), str(part), log_console=None)  # "interrupted" after step 2 ...
    train(cfg(4), str(part), log_console=None)  # ... and resumed from its checkpoint

    def step_rows(path):
        rows = [json.loads(line) for line in open(path / "metrics.jsonl")]
        return {r["step"]: r for r in rows if "loss" in r}

    a, b = step_rows(full), step_rows(part)
    for step in (3, 4):
        for key in ("loss", "entropy", "reward", "grad_norm", "kl_ref", "h0"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
    wa = load_file(str(full / "export" / "model.safetensors"))
    wb = load_file(str(part / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_packed_run_equals_padded_run(policy_dir, tmp_path):
    """train.pack=True changes the layout of the forward passes only: same metrics per step."""
    def run(pack, workdir):
        c = tiny_config(policy_dir, "uec", steps=1)
        c.train.pack, c.train.micro_batches = pack, 2
        train(c, str(workdir), log_console=None)
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        return {r["step"]: r for r in rows if "loss" in r}

    a, b = run(False, tmp_path / "padded"), run(True, tmp_path / "packed")
    assert sorted(a) == sorted(b) == [1]
    for key in ("loss", "entropy", "reward", "grad_norm", "kl_ref", "h0", "response_length"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-7), key


def test_sigterm_saves_and_exits(policy_dir, tmp_path):
    """A real SIGTERM to a running `python -m uecjax.train`: it saves the step and exits 0."""
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom loop_helpers import tiny_config, write_policy\n"
        "def get_config():\n    return tiny_config(%r, 'grpo', steps=1000)\n"
        % (os.path.join(REPO, "tests"), policy_dir))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "uecjax.train", f"--config={cfg_file}",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/1000"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    lines.append(out)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert "preemption: saved step" in "".join(lines)
    step = ckpt.Checkpointer(str(tmp_path / "run" / "checkpoints"), read_only=True).latest_step()
    assert step is not None and step >= 2


def test_bad_input_messages(policy_dir, tmp_path):
    c = tiny_config(policy_dir)
    c.method = "nope"
    with pytest.raises(ConfigValueError, match="config.method='nope'"):
        train(c, str(tmp_path), log_console=None)
    c = tiny_config(policy_dir)
    c.train.steps = 0
    with pytest.raises(ConfigValueError, match="config.train.steps=0"):
        train(c, str(tmp_path), log_console=None)
    # The CLI prints the message, no traceback, exit code 2.
    result = subprocess.run(
        [sys.executable, "-m", "uecjax.train", "--config=configs/math.py",
         "--config.data.path=/nonexistent/math", "--config.model.path=/nonexistent/model",
         f"--workdir={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: config.model.path='/nonexistent/model': checkpoint directory not found" in result.stderr
    assert "huggingface-cli download" in result.stderr and "Traceback" not in result.stderr


def test_resume_skips_a_damaged_latest_checkpoint(policy_dir, tmp_path):
    """The newest checkpoint's parameter files are truncated: the run says so in one line,
    resumes from the step before and finishes."""
    import io

    train(tiny_config(policy_dir, "grpo", steps=2), str(tmp_path), log_console=None)
    data = [os.path.join(root, f) for root, _, names in os.walk(tmp_path / "checkpoints" / "2" / "params")
            for f in names if os.path.basename(root) == "d"]
    assert data
    for f in data:
        os.truncate(f, os.path.getsize(f) // 2)
    console = io.StringIO()
    summary = train(tiny_config(policy_dir, "grpo", steps=3), str(tmp_path), log_console=console)
    lines = console.getvalue().splitlines()
    assert sum(line.startswith("checkpoint 2 does not restore") for line in lines) == 1, lines[:5]
    assert any(line.startswith("resumed from") and line.rstrip().endswith("at step 1") for line in lines)
    assert summary["step"] == 3


def test_lora_resume_equals_uninterrupted_and_exports(policy_dir, tmp_path):
    """A LoRA run (uec, KL to the base with the adapters off) resumed from its checkpoint
    equals the uninterrupted run; checkpoints hold the adapters alone; the adapter (PEFT
    layout) and the merged policy (HF layout) are exported."""
    def cfg(steps):
        c = tiny_config(policy_dir, "uec", steps=steps)
        c.model.lora.update(rank=4, alpha=8.0)
        c.train.export_hf = True
        return c

    full, part = tmp_path / "full", tmp_path / "part"
    summary = train(cfg(3), str(full), log_console=None)
    train(cfg(2), str(part), log_console=None)
    train(cfg(3), str(part), log_console=None)
    a, b = ({r["step"]: r for r in map(json.loads, open(p / "metrics.jsonl")) if "loss" in r}
            for p in (full, part))
    for key in ("loss", "entropy", "reward", "grad_norm", "kl_ref", "h0"):
        assert a[3][key] == pytest.approx(b[3][key], rel=1e-5, abs=1e-7), key
    assert a[2]["kl_ref"] > 0  # the adapters moved away from the base
    for file in ("adapter/adapter_model.safetensors", "export/model.safetensors"):
        wa, wb = load_file(str(full / file)), load_file(str(part / file))
        assert wa.keys() == wb.keys()
        for name in wa:
            np.testing.assert_allclose(wa[name], wb[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert summary["adapter"] == str(full / "adapter")
    step = ckpt.Checkpointer(str(full / "checkpoints"), read_only=True).latest_step()
    saved = (full / "checkpoints" / str(step) / "params" / "_METADATA").read_text()
    assert "q_lora_a" in saved and "q_w" not in saved and "embed" not in saved  # the adapters alone
