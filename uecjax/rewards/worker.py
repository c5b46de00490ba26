"""A grading worker process: `python -P worker.py --worker SOFT_TIMEOUT MEMORY_MB`, JSON
lines `[id, pred, gold]` in on stdin, `[id, ok, status]` out (`uecjax.rewards.grader` starts
and supervises it). It imports only `grading`, so it starts fast."""

from __future__ import annotations

import json
import logging
import os
import sys

from uecjax.rewards.grading import grade_answer

class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker; a BaseException so math-verify's `except Exception`
    handlers do not swallow it and carry on with the next comparison."""


def _serve_worker(soft_timeout_s: float, memory_limit_mb: int) -> None:
    """A grading worker: JSON lines `[id, pred, gold]` in on stdin, `[id, ok, status]` out.

    Runs as `python -P worker.py --worker ...` (not a fork of the caller, which may hold JAX
    threads). The soft timeout (SIGALRM, this is the worker's main thread) ends slow pure-Python
    work and keeps the worker; the caller's hard deadline kills it when C code ignores signals.
    """
    import signal

    proto = os.fdopen(os.dup(1), "w", buffering=1)  # protocol channel
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    try:  # die with the parent even if it is killed without cleaning up (Linux only)
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its own timeouts are off
    grade_answer("1", "1")  # import and warm up before saying ready
    if memory_limit_mb > 0:
        import resource
        limit = memory_limit_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def on_alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, on_alarm)
    proto.write('["ready"]\n')
    for line in sys.stdin:
        task_id, pred, gold = json.loads(line)
        try:
            signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            try:
                ok, status = grade_answer(pred, gold), "ok"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            ok, status = False, "timeout"
        except (Exception, RecursionError, MemoryError):
            ok, status = False, "error"
        proto.write(json.dumps([task_id, ok, status]) + "\n")


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _serve_worker(float(sys.argv[2]), int(sys.argv[3]))
