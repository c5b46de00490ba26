"""How this process joins a multi-process job (GPU clusters, Cloud TPU slices, SLURM).

    from uecjax.parallel import launch
    launch.initialize_from_flags()      # first thing in a main, before any device use

`detect` reads the launch: explicit (`--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`, the three together), a Cloud TPU VM slice (the TPU environment variables or
JAX's own Cloud TPU check; `jax.distributed.initialize()` then reads the workers from the TPU
metadata), or SLURM (`srun` with more than one task; one task per host, or per GPU with
`--gpus-per-task`). `--distributed=off` forces a single process. Every process then runs the
same program over the global mesh; `uecjax.parallel.hosts` is how they share the rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "off")
_TPU_HOST_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(ValueError):
    """Inconsistent multi-process settings; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the job: `kind` is explicit | tpu | slurm; the explicit fields are
    None where JAX detects them from the environment."""

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _on_cloud_tpu_vm() -> bool:
    # Set by JAX's Cloud TPU start-up check (TPU chips on the PCI bus and libtpu installed); a
    # private attribute, so read defensively.
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, *, mode: str = "auto",
           env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None for a single process (module docstring)."""
    env = os.environ if env is None else env
    if mode not in MODES:
        raise DistributedError(f"--distributed={mode!r}: choose from {MODES}")
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if mode == "off":
        if given:
            raise DistributedError(f"--distributed=off with --{given[0]}: drop one of them")
        return None
    if given:
        missing = [k for k in explicit if explicit[k] is None]
        if missing:
            raise DistributedError(
                f"--{given[0]} is set but --{missing[0]} is not: pass --coordinator_address, "
                "--num_processes and --process_id together (or none of them)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id={process_id}, --num_processes={num_processes}: "
                                   "need 0 <= process_id < num_processes")
        return Launch("explicit", coordinator_address, num_processes, process_id)
    hosts = next((env[k] for k in _TPU_HOST_LISTS if env.get(k)), "")
    if len([h for h in hosts.split(",") if h]) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch("tpu")
    if all(k in env for k in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return Launch("slurm")
    if env is os.environ and _on_cloud_tpu_vm():
        return Launch("tpu")
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, mode: str = "auto") -> Launch | None:
    """Joins the multi-process job if there is one (see `detect`); returns the launch.

    Call before anything touches a device. Calling it again (or after another caller
    initialised JAX's distributed runtime) does nothing.
    """
    if jax.distributed.is_initialized():
        return None
    launch = detect(coordinator_address, num_processes, process_id, mode=mode)
    if launch is None:
        return None
    jax.distributed.initialize(coordinator_address=launch.coordinator_address,
                               num_processes=launch.num_processes, process_id=launch.process_id)
    log.info("joined a %s job as process %d of %d (%d local devices of %d)", launch.kind,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return launch


def define_flags() -> None:
    """The absl flags `initialize_from_flags` reads (call once, in a main module)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process runs: HOST:PORT of process 0 (with --num_processes and "
                        "--process_id). TPU slices and SLURM are detected without it.")
    flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
    flags.DEFINE_enum("distributed", "auto", list(MODES),
                      "auto: join a multi-process job when the flags or the environment (TPU "
                      "slice, SLURM) say so; off: always a single process.")


def initialize_from_flags() -> Launch | None:
    from absl import flags

    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, mode=f.distributed)


def is_main_process() -> bool:
    """Process 0: the one that writes logs, exports and other single-writer files."""
    return jax.process_index() == 0
