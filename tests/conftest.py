"""Test-wide settings: 8 simulated CPU devices for sharding tests, float32 matmuls exact, and one
compilation cache for the whole run.

Many tests build a fresh jitted closure around the same program (a TrainStep per test, a sampler
per test); JAX's in-memory cache is keyed by the function object, so each would recompile. The
persistent cache is keyed by the compiled program itself, so identical programs compile once per
run (measured: the every-method loop tests 166 s -> 101 s on 2 cores). Subprocesses started by
tests inherit the directory through the environment. Set JAX_COMPILATION_CACHE_DIR to keep a
cache across runs.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _run_cache_dir() -> str:
    """One compilation cache per test run; pytest-xdist's workers of one run share it."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None:
        return tempfile.mkdtemp(prefix="uecjax-test-jit-")
    path = os.path.join(tempfile.gettempdir(), f"uecjax-test-jit-{run_id}")
    os.makedirs(path, exist_ok=True)
    return path


os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _run_cache_dir())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
