r"""Rewards for verifiable answers: `\boxed{}` extraction, format, and time-bounded grading.

    with RewardGrader(timeout_s=5.0) as grader:
        future = grader.grade_batch(responses, answers, choices)  # returns at once
        ...                                                       # next rollout meanwhile
        rewards = future.result()                                 # list[Reward]

Reward (ALGORITHMS.md section 1): r = w_f * format + (1 - w_f) * accuracy, w_f = 0.1 by default,
accuracy and format in {0, 1}.

Accuracy: the content of the LAST `\boxed{...}` of the response (braces matched, nested braces
allowed; an unbalanced last box means no answer) is compared with the reference answer by
math-verify: symbolic and numeric equivalence, so `5\sqrt{3}` == `5 \sqrt { 3 }` and
`\frac{15}{2}` == `7.5`. When the problem has multiple choices (Geometry3K), a bare letter
(`C`, `(C)`, `C.`, `\text{C}`) stands for that choice's text, which is then graded; the choice
text itself is graded like any answer.

Format (`format_reward`), after stripping surrounding whitespace the response must be
`<think>THINKING</think>ANSWER` with exactly one `<think>` (the first characters) and exactly one
`</think>` after it, THINKING anything (empty allowed), and ANSWER containing a `\boxed{...}`
with balanced braces and a non-empty answer of at most `max_answer_chars` characters. This is
the common Geometry3K recipe's `<think>.*</think>.*\\boxed\{.*\}.*` with real brace matching and a
single think block. With `think_prefilled=True` (a chat template that already ends the prompt
with `<think>`) the response must not open another one and only the `</think>` is required.

Why worker processes: model output can hold `10^{10^{10^{10}}}` or `(10^{10})!`, which sympy may
try to evaluate for hours, possibly inside C code that never checks for signals (GMP via gmpy2
when it is installed, a backtracking regular expression); a thread cannot be stopped at all, and
math-verify's own timeout uses `signal.alarm`, which works only in a main thread. So the
symbolic comparison runs in separate worker processes, one answer at a time each, with two
bounds: a soft SIGALRM inside the worker (cuts pure-Python sympy work, the worker lives on) and
a hard deadline kept by the caller (the worker is killed and replaced). Either way that answer
scores 0. Everything cheap and linear (extraction, format, whitespace-equal answers, choice
letters) runs in the caller, and inputs are capped (length, brace depth) before any parser sees
them. Nothing evaluates model output as code: the only parser applied to it is math-verify's
LaTeX grammar parser (latex2sympy2); its `ExprExtractionConfig`, which goes through sympy's
`parse_expr` (eval), is not used.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from typing import NamedTuple, Sequence

logger = logging.getLogger(__name__)

FORMAT_WEIGHT = 0.1  # w_f of ALGORITHMS.md section 1
MAX_ANSWER_CHARS = 1000  # a longer boxed answer counts as no answer (never parsed)
MAX_BRACE_DEPTH = 32  # a deeper boxed answer is graded 0 without parsing
MAX_RESPONSE_CHARS = 200_000  # only this many final characters are searched for the box
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)  # `\{` and `\\` are not group braces
_LETTER = re.compile(
    r"^\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?\(?\s*([A-Z])\s*\)?\s*[.:]?\s*\}?\s*$")


class Reward(NamedTuple):
    """The grade of one response. `status` says why accuracy is what it is."""

    reward: float  # w_f * format + (1 - w_f) * accuracy
    accuracy: float  # 1.0 if the extracted answer is equivalent to the reference, else 0.0
    format: float  # 1.0 if the response follows the format rule (module docstring)
    extracted: str | None  # content of the last \boxed{}, None if there is none
    # ok | no_answer | too_long | too_deep | bad_choice | timeout | crashed | error
    status: str


# ----------------------------------------------------------------------------- extraction


def _last_box(text: str, max_chars: int | None) -> tuple[str | None, str]:
    """(content of the last box, "ok") or (None, "no_answer" | "too_long")."""
    text = text[-MAX_RESPONSE_CHARS:]
    last = None
    for last in _BOXED.finditer(text):
        pass
    if last is None:
        return None, "no_answer"
    open_pos = last.end() - 1
    # Scan at most max_chars + 2 characters: the cost of matching is bounded whatever follows.
    end = len(text) if max_chars is None else min(len(text), open_pos + 2 + max_chars)
    depth = 0
    for m in _BRACE_OR_ESCAPE.finditer(text, open_pos, end):
        c = m.group()
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[last.end():m.start()].strip(), "ok"
    return None, ("too_long" if end < len(text) else "no_answer")


def extract_boxed(text: str, max_chars: int | None = MAX_ANSWER_CHARS) -> str | None:
    r"""Content of the LAST `\boxed{...}` in `text`, stripped; None if there is none.

    Braces are matched (`\boxed{\frac{1}{2}}` -> `\frac{1}{2}`); escaped braces `\{ \}` do
    not count. If the last box is unbalanced, or its content is longer than `max_chars`, the
    result is None: an earlier box is not used instead, because the model's final answer is the
    last one. Only the last `MAX_RESPONSE_CHARS` characters are searched, and at most
    `max_chars` of them are scanned for the closing brace, so the cost is bounded.
    """
    return _last_box(text, max_chars)[0]


def brace_depth(text: str) -> int:
    """Maximum nesting depth of (unescaped) braces in `text`."""
    depth = best = 0
    for m in _BRACE_OR_ESCAPE.finditer(text):
        c = m.group()
        if c == "{":
            depth += 1
            best = max(best, depth)
        elif c == "}":
            depth -= 1
    return best


def format_reward(response: str, *, think_prefilled: bool = False,
                  max_answer_chars: int = MAX_ANSWER_CHARS) -> float:
    """1.0 if `response` follows the `<think>...</think>` + `\\boxed{}` rule (module docstring)."""
    text = response.strip()
    if think_prefilled:
        if THINK_OPEN in text:
            return 0.0
    else:
        if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1:
            return 0.0
    if text.count(THINK_CLOSE) != 1:
        return 0.0
    answer_part = text[text.index(THINK_CLOSE) + len(THINK_CLOSE):]
    return 1.0 if extract_boxed(answer_part, max_answer_chars) else 0.0


def _squash(s: str) -> str:
    """`s` without whitespace and `$`: cheap equality that needs no parser."""
    return re.sub(r"[\s$]+", "", s)


def choice_letter(answer: str, num_choices: int) -> int | None:
    r"""Index of the choice a bare letter names (`C`, `(C)`, `C.`, `\text{C}`), else None."""
    m = _LETTER.match(answer)
    if m is None:
        return None
    index = ord(m.group(1)) - ord("A")
    return index if index < num_choices else -1  # -1: a letter, but no such choice


# ----------------------------------------------------------------------------- grading


def grade_answer(pred: str, gold: str) -> bool:
    """math-verify equivalence of `pred` to `gold`, IN THIS PROCESS AND WITHOUT A TIME BOUND.

    For trusted strings (tests, a dataset's own answers). Model output goes through
    `RewardGrader`, which runs this in a worker process under a deadline.
    """
    from math_verify import LatexExtractionConfig, parse, verify

    # Both sides become `\boxed{...}` so the LaTeX extractor reads the whole string (a bare
    # `5\sqrt{3}` has no anchor it would find); the braces are balanced by construction.
    config = [LatexExtractionConfig(boxed_match_priority=0)]
    gold_parsed = parse("\\boxed{" + gold + "}", extraction_config=config, parsing_timeout=None)
    pred_parsed = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _prepare(response: str, gold: str, choices: Sequence[str] | None, format_weight: float,
             think_prefilled: bool, max_answer_chars: int):
    """The cheap, in-process part of grading one response.

    Returns (Reward, None) when decided here, or (partial Reward, (pred, gold)) when the
    symbolic comparison is needed.
    """
    fmt = format_reward(response, think_prefilled=think_prefilled,
                        max_answer_chars=max_answer_chars)
    extracted, why = _last_box(response, max_answer_chars)

    def done(acc: float, status: str) -> Reward:
        return Reward(format_weight * fmt + (1.0 - format_weight) * acc, acc, fmt, extracted,
                      status)

    if not extracted:
        return done(0.0, why if extracted is None else "no_answer"), None
    pred = extracted.strip("$").strip()
    if not pred:
        return done(0.0, "no_answer"), None
    if _squash(pred) == _squash(gold):  # most correct answers: no parser needed
        return done(1.0, "ok"), None
    if choices:
        # Letters stand for their choice's text, on either side (some datasets store the
        # reference answer as a letter).
        gold_index = choice_letter(gold, len(choices))
        if gold_index is not None and gold_index >= 0:
            gold = choices[gold_index]
        index = choice_letter(pred, len(choices))
        if index == -1:
            return done(0.0, "bad_choice"), None
        if index is not None:
            pred = choices[index]
        if _squash(pred) == _squash(gold):
            return done(1.0, "ok"), None
    if brace_depth(pred) > MAX_BRACE_DEPTH:
        return done(0.0, "too_deep"), None
    return done(0.0, "ok"), (pred, gold)


# ----------------------------------------------------------------------------- worker process


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in a worker; a BaseException so math-verify's `except Exception`
    handlers do not swallow it and carry on with the next comparison."""


def _serve_worker(soft_timeout_s: float, memory_limit_mb: int) -> None:
    """A grading worker: JSON lines `[id, pred, gold]` in on stdin, `[id, ok, status]` out.

    Runs as `python -P rewards.py --worker ...` (not a fork of the caller, which may hold JAX
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


class _Worker:
    """One worker process and the task it is running."""

    def __init__(self, soft_timeout_s: float, memory_limit_mb: int):
        cmd = [sys.executable, "-P", os.path.abspath(__file__), "--worker",
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
            f"reward grading worker {why}. It runs `{sys.executable} -P {__file__} --worker` "
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
        from uecjax.data.countdown import grade_countdown, parse_answer_key

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


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _serve_worker(float(sys.argv[2]), int(sys.argv[3]))
