"""Two processes on one CPU machine (2 simulated devices each, gloo collectives) run
`python -m uecjax.train` exactly as one process with the same 4 devices does: same metrics at
every step, same final parameters; the checkpoint is written once and a second two-process
launch resumes from it. Each process reads only its half of every prompt batch (the prompts
are exchanged) and the checkpoint holds both processes' data iterator states.

The mesh is fsdp=4 (data=1), so every parameter is split across both processes: the batch is
assembled from per-process rows, gradients are reduced across processes, and the checkpoint
and the export gather sharded arrays.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from loop_helpers import fsdp_config, geo3k_config, write_policy
from uecjax import checkpoint as ckpt
from uecjax.parallel.launch import DistributedError, Launch, detect
from uecjax.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("loss", "entropy", "grad_norm", "kl_ref", "reward", "response_length")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return write_policy(tmp_path_factory.mktemp("policy"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(config_file, workdir, cache_dir, steps):
    """`python -m uecjax.train` as processes 0 and 1 of a job on localhost; waits for both."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
               # the second launch reuses the first one's compiled programs
               JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "uecjax.train", f"--config={config_file}", f"--workdir={workdir}",
         f"--config.train.steps={steps}", f"--coordinator_address=localhost:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    return outputs


def step_rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"  # process 0 only
    return {r["step"]: r for r in rows if "loss" in r}


def test_two_processes_equal_one_and_resume(policy_dir, tmp_path):
    """Also packed (train.pack): each process packs its own rows, with the row count they agree on."""
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from loop_helpers import fsdp_config\n"
        f"def get_config():\n    c = fsdp_config({policy_dir!r}, steps=1)\n"
        "    c.train.pack = True\n    return c\n")
    multi, cache = tmp_path / "multi", tmp_path / "cache"

    out = launch(config_file, multi, cache, steps=1)
    assert "step 1/1" in out[0] and "step 1/1" not in out[1]  # only process 0 logs
    # Each process samples, grades and trains on its own half of every batch.
    assert "2 processes, 2 row shares: each samples, grades and trains on 2 of 4 rows" in out[0]
    checkpoints = multi / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["1"]  # one commit, no tmp directory left
    out = launch(config_file, multi, cache, steps=2)
    assert f"resumed from {checkpoints} at step 1" in out[0]
    assert sorted(os.listdir(checkpoints)) == ["1", "2"]
    assert ckpt.Checkpointer(str(checkpoints), read_only=True).latest_step() == 2

    single = tmp_path / "single"
    cfg = fsdp_config(policy_dir, steps=2)
    cfg.train.pack = True
    cfg.mesh.num_devices = 4  # the same 4 devices (of the suite's 8), one process
    train(cfg, str(single), log_console=None)

    # Each process read its own prompt per step (prompts_per_batch=2 over 2 processes) and
    # restored its own iterator state; the one-process run read both.
    meta = lambda run: json.load(open(run / "checkpoints" / "2" / "meta" / "metadata"))  # noqa: E731
    assert meta(multi)["data_iterators"] == [{"next_index": 2}, {"next_index": 2}]
    assert meta(single)["data_iterator"] == {"next_index": 4} and "data_iterators" not in meta(single)

    a, b = step_rows(single), step_rows(multi)
    assert sorted(a) == sorted(b) == [1, 2]
    assert a[2]["grad_norm"] > 0 and a[2]["kl_ref"] > 0
    for step in (1, 2):
        for key in METRICS:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    # Held-out evaluation (initial and final): each process grades its own prompts, and the
    # gathered metrics equal the one-process evaluation's.
    evals = lambda run: {r["step"]: r for r in (json.loads(line) for line in open(run / "metrics.jsonl"))  # noqa: E731
                         if "eval/pass@1" in r}
    ea, eb = evals(single), evals(multi)
    assert sorted(ea) == [0, 2] and sorted(eb) == [0, 1, 2]  # the first launch ended at step 1
    for step in ea:
        for key in ("eval/pass@1", "eval/greedy_pass@1", "eval/response_length",
                    "eval/greedy_response_length", "eval/num_prompts"):
            assert eb[step][key] == pytest.approx(ea[step][key]), (step, key)
    wa = load_file(str(single / "export" / "model.safetensors"))
    wb = load_file(str(multi / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    # Cross-process reductions add in another order: with lr 1e-3, Adam's steps move weights
    # by ~1e-3 and the two runs agree to 1% of one step.
    for name in wa:
        assert wb[name] == pytest.approx(wa[name], rel=1e-5, abs=1e-5), name


def test_two_processes_agree_on_selective_rollouts(policy_dir, tmp_path):
    """uec keeps a different number of rows on each process (retention, exploration of hard
    prompts, padding after max_rounds): the processes still agree on every collective call
    (sampling rounds, exploration batches, replay, checkpoint), log merged metrics once, and
    a second launch resumes."""
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from loop_helpers import fsdp_config\n"
        # retain_gated=False: hard prompts' zero-advantage rows are dropped, so each process
        # keeps its own number of rows (with the gate's default every regular row stays).
        f"def get_config():\n    c = fsdp_config({policy_dir!r}, steps=1, method='uec')\n"
        "    c.rollout.retain_gated = False\n    return c\n")
    multi, cache = tmp_path / "multi", tmp_path / "cache"
    launch(config_file, multi, cache, steps=1)
    out = launch(config_file, multi, cache, steps=2)
    assert f"resumed from {multi / 'checkpoints'} at step 1" in out[0]
    rows = step_rows(multi)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        # The tiny random policy fails every prompt: both processes' prompts are hard (4 of
        # them), explored, and the batch is padded after max_rounds=2 rounds.
        assert row["rollout/rounds"] == 2 and row["explore/prompts"] == 4
        assert row["explore/responses"] == 8 and row["rollout/padded_rows"] == 4


def test_two_processes_train_a_vl_policy_as_one(tmp_path):
    """Geometry3K with a tiny Qwen2.5-VL: each process samples, scores and trains its own
    rows with their images; the processes agree on one patch width for the image arrays (step
    1's two prompts have 120 and 140 patches: buckets 128 and 256), and the metrics equal the
    one-process run's."""
    from tiny_hf import write_tiny_vl

    policy = tmp_path / "tiny-vl"
    write_tiny_vl(policy, seed=1)
    data = os.path.join(REPO, "tests", "data", "geometry3k")
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from loop_helpers import geo3k_config\n"
        f"def get_config():\n    return geo3k_config({str(policy)!r}, {data!r}, steps=1)\n")
    multi = tmp_path / "multi"
    out = launch(config_file, multi, tmp_path / "cache", steps=1)
    assert "2 processes, 2 row shares" in out[0] and "vision tower" in out[0]

    single = tmp_path / "single"
    cfg = geo3k_config(str(policy), data, steps=1)
    cfg.mesh.num_devices = 4
    train(cfg, str(single), log_console=None)
    a, b = step_rows(single), step_rows(multi)
    assert sorted(a) == sorted(b) == [1]
    for key in ("loss", "entropy", "grad_norm", "reward", "response_length", "sampled_tokens"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-7), key


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


def test_detect_the_launch():
    """Single process unless flags or the environment say otherwise; bad flags name themselves."""
    assert detect(env={}) is None
    assert detect("h:1234", 4, 2, env={}) == Launch("explicit", "h:1234", 4, 2)
    assert detect(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == Launch("tpu")
    assert detect(env={"TPU_WORKER_HOSTNAMES": "t0"}) is None  # one host: nothing to join
    assert detect(env={"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"}) == Launch("tpu")
    assert detect(env=SLURM) == Launch("slurm")
    assert detect(env={**SLURM, "SLURM_NTASKS": "1"}) is None
    assert detect(env=SLURM, mode="off") is None
    with pytest.raises(DistributedError, match="--coordinator_address is set but --num_processes is not"):
        detect("h:1234", env={})
    with pytest.raises(DistributedError, match="--process_id=2, --num_processes=2"):
        detect("h:1234", 2, 2, env={})
    with pytest.raises(DistributedError, match="--distributed=off with --process_id"):
        detect(process_id=0, mode="off", env={})


def test_cli_rejects_incomplete_distributed_flags(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "uecjax.train", "--config=configs/demo.py",
         "--coordinator_address=localhost:1", f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("error: --coordinator_address is set but --num_processes is not: pass "
            "--coordinator_address, --num_processes and --process_id together") in result.stderr
    assert "Traceback" not in result.stderr
