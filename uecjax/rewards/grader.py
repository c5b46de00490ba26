r"""Time-bounded grading of batches of responses (ALGORITHMS.md section 1).

    with RewardGrader(timeout_s=5.0) as grader:
        future = grader.grade_batch(responses, answers, choices)  # returns at once
        ...                                                       # next rollout meanwhile
        rewards = future.result()                                 # list[Reward]

Model output can hold `10^{10^{10^{10}}}`, which sympy may evaluate for hours inside C code
that ignores signals; so the symbolic comparison runs in worker processes (`worker.py`) with
a soft SIGALRM inside the worker and a hard deadline kept here (the worker is killed and
replaced); either way that answer scores 0. Everything cheap (extraction, format, equal
strings, choice letters) runs in the caller. Nothing evaluates model output as code.
`CountdownGrader` grades the countdown task in process; `make_grader` picks by data kind.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import Sequence

from uecjax.data.countdown import grade_countdown, parse_answer_key
from uecjax.rewards import worker
from uecjax.rewards.grading import FORMAT_WEIGHT, MAX_ANSWER_CHARS, Reward, _prepare

logger = logging.getLogger(__name__)

class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, soft_timeout_s: float, memory_limit_mb: int):
        cmd = [sys.executable, "-P", os.path.abspath(worker.__file__), "--worker",
               repr(soft_timeout_s), str(memory_limit_mb)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None  # index in the batch being graded
        self.deadline = float("inf")
        self._buffer = b""

    def send(self, task: int, pred: str, gold: str, timeout_s: float) -> None:
        # The worker is idle and blocked reading stdin, so this write cannot block for long.
        self.proc.stdin.write((json.dumps([task, pred, gold]) + "\n").encode())
        self.proc.stdin.flush()
        self.task, self.deadline = task, time.monotonic() + timeout_s

    def read(self) -> list[list] | None:
        """Messages available now; None if the worker closed its output (it died)."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:  # a broken pipe to a dead worker is expected here
                pass


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()


class RewardGrader:
    """Grades batches of responses in worker processes with a per-answer deadline.

    Args:
      num_workers: worker processes (default: half the CPU cores, between 1 and 8).
      timeout_s: hard deadline per answer for the symbolic comparison; an answer that misses
        it scores 0 (status "timeout") and its worker is killed and replaced.
      format_weight: w_f in r = w_f * format + (1 - w_f) * accuracy.
      think_prefilled: the chat template already opened `<think>` (see `format_reward`).
      max_answer_chars: longer boxed answers count as no answer.
      memory_limit_mb: address-space limit of each worker (0 = none), so an answer that
        builds a gigantic integer fails with MemoryError instead of swapping the host.
      soft_timeout_s: in-worker SIGALRM bound (default 0.8 * timeout_s; 0 = off). It cuts slow
        pure-Python sympy work without the cost of a process restart (about a second of
        imports); the hard deadline still covers C code that ignores signals.
      startup_timeout_s: how long a worker may take to import math-verify and start.

    Batches run one after another on a dispatcher thread, so `grade_batch` returns a future
    at once. Counters of what happened are in `stats` (for the logger). Use as a context
    manager or call `close()`; workers are also killed at interpreter exit.
    """

    def __init__(self, num_workers: int | None = None, timeout_s: float = 5.0,
                 format_weight: float = FORMAT_WEIGHT, think_prefilled: bool = False,
                 max_answer_chars: int = MAX_ANSWER_CHARS, memory_limit_mb: int = 4096,
                 soft_timeout_s: float | None = None, startup_timeout_s: float = 120.0):
        if num_workers is None:
            num_workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers}: must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0 seconds")
        _check_weight(format_weight)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.format_weight = float(format_weight)
        self.think_prefilled = think_prefilled
        self.max_answer_chars = max_answer_chars
        self.memory_limit_mb = memory_limit_mb
        self.startup_timeout_s = startup_timeout_s
        self._soft_timeout_s = 0.8 * self.timeout_s if soft_timeout_s is None else soft_timeout_s
        self.stats = {"graded": 0, "worker_calls": 0, "timeouts": 0, "soft_timeouts": 0,
                      "errors": 0, "crashes": 0, "restarts": 0}
        self._workers: list[_Worker] = []
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "reward-grader")
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        # Start the workers now, from the dispatcher thread (Linux ties PDEATHSIG to the
        # thread that spawned them), so they are warm when the first batch arrives.
        self._executor.submit(self._ensure_workers)

    # -- public API

    def grade_batch(self, responses: Sequence[str], answers: Sequence[str],
                    choices: Sequence[Sequence[str] | None] | None = None, *,
                    format_weight: float | None = None) -> concurrent.futures.Future:
        """Submit a batch; returns a Future of `list[Reward]` in the order of `responses`.

        `answers[i]` is the reference answer of response i; `choices[i]` its multiple-choice
        options (or None). `format_weight` overrides the grader's w_f for this batch.
        """
        if self._closed:
            raise RuntimeError("RewardGrader.grade_batch called after close()")
        responses, answers = list(responses), list(answers)
        choices = [None] * len(responses) if choices is None else list(choices)
        if not len(responses) == len(answers) == len(choices):
            raise ValueError(f"grade_batch: {len(responses)} responses, {len(answers)} answers "
                             f"and {len(choices)} choices; they must be aligned one per response")
        w = self.format_weight if format_weight is None else _check_weight(format_weight)
        return self._executor.submit(self._grade, responses, answers, choices, w)

    def grade(self, responses, answers, choices=None, **kwargs) -> list[Reward]:
        """Blocking `grade_batch`."""
        return self.grade_batch(responses, answers, choices, **kwargs).result()

    def close(self) -> None:
        """Finish queued batches, then stop the workers."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True)
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- dispatcher thread

    def _grade(self, responses, answers, choices, format_weight) -> list[Reward]:
        results: list[Reward | None] = []
        pending: list[tuple[int, str, str]] = []  # (index, pred, gold) for the workers
        for i, (response, gold, options) in enumerate(zip(responses, answers, choices)):
            options = () if options is None else tuple(str(c) for c in options)
            reward, task = _prepare(str(response), str(gold), options, format_weight,
                                    self.think_prefilled, self.max_answer_chars)
            results.append(reward)
            if task is not None:
                pending.append((i, *task))
        self.stats["graded"] += len(responses)
        if pending:
            try:
                self._run_tasks(pending, results, format_weight)
            except BaseException:
                # A worker still busy with this batch would later answer into the next one.
                for w in [w for w in self._workers if w.task is not None]:
                    self._replace(w)
                raise
        return results

    def _run_tasks(self, pending, results, format_weight) -> None:
        def finish(i: int, ok: bool, status: str) -> None:
            acc = 1.0 if ok else 0.0
            results[i] = results[i]._replace(
                reward=format_weight * results[i].format + (1.0 - format_weight) * acc,
                accuracy=acc, status=status)

        self.stats["worker_calls"] += len(pending)
        queue = list(reversed(pending))  # pop() from the end keeps the batch order
        tasks = {i: (pred, gold) for i, pred, gold in pending}
        remaining = len(pending)
        while remaining:
            self._ensure_workers()
            for w in list(self._workers):
                if w.ready and w.task is None and queue:
                    i, pred, gold = queue.pop()
                    try:
                        w.send(i, pred, gold, self.timeout_s)
                    except OSError:  # it died since it said ready: retry the task elsewhere
                        queue.append((i, pred, gold))
                        w.task = None
                        self._replace(w)
            now = time.monotonic()
            busy = [w for w in self._workers if w.task is not None]
            wake = min([w.deadline for w in busy], default=now + 1.0)
            readable, _, _ = select.select([w.fd for w in self._workers], [], [],
                                           max(0.0, min(wake - now, 1.0)))
            for w in list(self._workers):
                if w.fd in readable:
                    messages = w.read()
                    if messages is None:  # died: crashed, or killed by the OS
                        if w.task is not None:
                            finish(w.task, False, "crashed")
                            remaining -= 1
                            self.stats["crashes"] += 1
                        elif not w.ready:
                            self._startup_failed(w)
                        self._replace(w)
                        continue
                    for message in messages:
                        if message == ["ready"]:
                            w.ready = True
                            continue
                        i, ok, status = message
                        if i != w.task:  # cannot happen with one task per worker
                            raise RuntimeError(f"reward worker answered task {i}, "
                                               f"expected {w.task}")
                        finish(i, ok, status)
                        remaining -= 1
                        w.task, w.deadline = None, float("inf")
                        if status == "timeout":
                            self.stats["soft_timeouts"] += 1
                        elif status == "error":
                            self.stats["errors"] += 1
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now > w.deadline:
                    logger.warning("reward grading timed out after %.1f s; answer scored 0, "
                                   "worker restarted: %.200r", self.timeout_s, tasks[w.task][0])
                    finish(w.task, False, "timeout")
                    remaining -= 1
                    self.stats["timeouts"] += 1
                    self._replace(w)
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    self._startup_failed(w, timed_out=True)

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._soft_timeout_s, self.memory_limit_mb))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.stats["restarts"] += 1
        self._ensure_workers()

    def _startup_failed(self, w: _Worker, timed_out: bool = False) -> None:
        w.kill()
        self._workers.remove(w)
        why = (f"did not start within {self.startup_timeout_s:.0f} s" if timed_out
               else f"exited during start-up with code {w.proc.returncode} (its error is "
                    "printed above)")
        raise RuntimeError(
            f"reward grading worker {why}. It runs `{sys.executable} -P {worker.__file__} --worker` "
            "and needs math-verify: check `python -c 'import math_verify'` "
            "(pip install 'math-verify>=0.9').")


class CountdownGrader:
    """Grades countdown responses (`uecjax.data.countdown`) in this process, with the
    `RewardGrader` interface (`grade_batch` -> Future of `list[Reward]`, `grade`, `close`).

    `answers[i]` is the problem as `uecjax.data.countdown.answer_key` writes it, `"3 5 7|22"`
    (the records of `countdown_source` carry it: the loop hands graders nothing else of the
    problem); `choices` are ignored. Reward: accuracy 1.0 iff the response is a well-formed
    expression using each number once that equals the target; format 1.0 iff it is a
    well-formed expression (any numbers, any value); reward = w_f * format + (1 - w_f) *
    accuracy; extracted = the expression text; status ok | no_answer | too_long | malformed |
    wrong_numbers | wrong_value. A response is parsed once, in linear time over at most
    `MAX_CHARS` characters, without evaluating anything as code: no worker processes, no
    deadline, and `grade_batch` returns a finished Future.
    """

    def __init__(self, format_weight: float = 0.0):
        self.format_weight = _check_weight(format_weight)
        self.stats = {"graded": 0}
        self._closed = False

    def grade_batch(self, responses: Sequence[str], answers: Sequence[str],
                    choices: Sequence[Sequence[str] | None] | None = None, *,
                    format_weight: float | None = None) -> concurrent.futures.Future:
        """A finished Future of `list[Reward]`, in the order of `responses`."""
        if self._closed:
            raise RuntimeError("CountdownGrader.grade_batch called after close()")
        responses, answers = list(responses), list(answers)
        if len(responses) != len(answers) or (choices is not None and
                                               len(choices) != len(responses)):
            raise ValueError(f"grade_batch: {len(responses)} responses, {len(answers)} answers"
                             + ("" if choices is None else f" and {len(choices)} choices")
                             + "; they must be aligned one per response")
        w = self.format_weight if format_weight is None else _check_weight(format_weight)
        rewards = []
        for response, answer in zip(responses, answers):
            numbers, target = parse_answer_key(answer)
            g = grade_countdown(str(response), numbers, target)
            rewards.append(Reward(w * g.format + (1.0 - w) * g.accuracy, g.accuracy, g.format,
                                  g.extracted, g.status))
        self.stats["graded"] += len(rewards)
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_result(rewards)
        return future

    def grade(self, responses, answers, choices=None, **kwargs) -> list[Reward]:
        """Blocking `grade_batch`."""
        return self.grade_batch(responses, answers, choices, **kwargs).result()

    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_grader(data_kind: str, *, num_workers: int | None = None, timeout_s: float = 5.0,
                format_weight: float = FORMAT_WEIGHT, think_prefilled: bool = False):
    """The grader of a run's task (config.data.kind): `CountdownGrader` for "countdown",
    else a `RewardGrader` (math-verify on the last `\\boxed{}`) with these settings."""
    if data_kind == "countdown":
        return CountdownGrader(format_weight=format_weight)
    return RewardGrader(num_workers=num_workers, timeout_s=timeout_s,
                        format_weight=format_weight, think_prefilled=think_prefilled)


def _check_weight(w: float) -> float:
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"format_weight={w}: must be in [0, 1] (r = w * format + (1 - w) * acc)")
    return float(w)


# ----------------------------------------------------------------------------- module API

_default: RewardGrader | None = None
_default_lock = threading.Lock()


def default_grader() -> RewardGrader:
    """A process-wide grader with default settings, created on first use."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = RewardGrader()
        return _default


def grade_batch(responses: Sequence[str], answers: Sequence[str],
                choices: Sequence[Sequence[str] | None] | None = None, *,
                grader: RewardGrader | None = None,
                format_weight: float | None = None) -> concurrent.futures.Future:
    """Submit a batch for grading; returns a Future of `list[Reward]` (see `RewardGrader`)."""
    grader = grader or default_grader()
    return grader.grade_batch(responses, answers, choices, format_weight=format_weight)
