"""The embedded countdown task: reach a target with each given number once, + - * only.

    3 5 7 to 22:     ->  3*5+7   (also 5*3+7, 7+3*5, 7+5*3)

    source = countdown_source("train", 1000, seed=0, levels=(1, 2))   # answers: "3 5 7|22"

A problem has several correct strings, and on level 2 (4 numbers; targets with few solutions
that `random_attempt` hits at most `max_success` of the time) a correct string is rare: uniform
attempts succeed on well under 1% of samples yet usually find one in a few hundred. Expressions
have no parentheses, normal precedence, numbers of at most `MAX_DIGITS` digits without a
leading zero, values within +-`MAX_VALUE` (`parse_expression`, `grade_countdown`). The train
and test splits never share a problem (a hash of its canonical text decides). Rules, levels
and measured statistics: docs/DESIGN.md, "The embedded tasks and their warm-ups".
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from typing import NamedTuple, Sequence

from uecjax.data.demo import SPLITS as demo_splits
from uecjax.data.demo import check_generator_args, distinct_records, record_id, seeded_rng
from uecjax.data.records import Record
from uecjax.data.sources import RecordSource

SPLITS = demo_splits  # the same splits as the demo task
OPERATORS = "+-*"
DIGITS = "0123456789"
MAX_DIGITS = 4  # a longer number is malformed (both the host and the int32 parsers)
MAX_VALUE = 10**9  # |product term| or |running sum| above this: malformed (int32-safe: 2e9 < 2^31)
MAX_CHARS = 64  # a longer stripped response scores 0 without being parsed
STOP_MARKERS = ("<|im_end|>", "<|endoftext|>")  # one trailing stop marker is removed


@dataclasses.dataclass(frozen=True)
class Level:
    """Shape of one difficulty level's problems."""

    count: int  # numbers per problem
    low: int  # each number is drawn uniformly from low..high (repeats allowed)
    high: int
    max_solutions: int | None = None  # at most this many distinct solution strings
    max_success: float | None = None  # at most this chance that `random_attempt` solves it


LEVELS = {
    1: Level(count=3, low=1, high=9),
    2: Level(count=4, low=1, high=9, max_solutions=4, max_success=0.01),
}


# ----------------------------------------------------------------------------- expressions


def _fold(numbers: Sequence[int], ops: Sequence[str]) -> int | None:
    """Value of numbers[0] ops[0] numbers[1] ... with * before + -, None on leaving MAX_VALUE.

    The int32 parser of `uecjax.testbed.countdown_reward` folds the same way, one number at
    a time: a `*` extends the product term, a `+` / `-` adds the term to the sum and starts a
    new one, so both check the same intermediate values.
    """
    total, term = 0, numbers[0]
    for op, n in zip(ops, numbers[1:]):
        if op == "*":
            term *= n
            if abs(term) > MAX_VALUE:
                return None
        else:
            total += term
            if abs(total) > MAX_VALUE:
                return None
            term = n if op == "+" else -n
    total += term
    return None if abs(total) > MAX_VALUE else total


def parse_expression(text: str) -> tuple[int, tuple[int, ...]] | None:
    """(value, numbers in order of appearance) of a well-formed expression, else None.

    `text` is taken as is (no stripping): any character other than digits and + - *, an
    operator first, last or after another, an empty text, a number with a leading zero or
    more than MAX_DIGITS digits, or a value out of +-MAX_VALUE makes it malformed.
    """
    if not text:
        return None
    runs, ops, current = [], [], ""
    for ch in text:
        if ch in DIGITS:
            current += ch
        elif ch in OPERATORS:
            if not current:  # leading operator, or two in a row
                return None
            runs.append(current)
            ops.append(ch)
            current = ""
        else:
            return None
    if not current:  # trailing operator
        return None
    runs.append(current)
    if any(len(r) > MAX_DIGITS or (len(r) > 1 and r[0] == "0") for r in runs):
        return None
    numbers = tuple(int(r) for r in runs)
    value = _fold(numbers, ops)
    return None if value is None else (value, numbers)


def evaluate_expression(text: str) -> int | None:
    """Value of a well-formed expression (`parse_expression`), None when malformed."""
    parsed = parse_expression(text)
    return None if parsed is None else parsed[0]


def _render(numbers: Sequence[int], ops: Sequence[str]) -> str:
    return str(numbers[0]) + "".join(op + str(n) for op, n in zip(ops, numbers[1:]))


def _check_numbers(numbers) -> tuple[int, ...]:
    numbers = tuple(int(n) for n in numbers)
    if not numbers:
        raise ValueError("numbers=(): a countdown problem needs at least one number")
    bad = [n for n in numbers if not 0 <= n < 10**MAX_DIGITS]
    if bad:
        raise ValueError(f"numbers={numbers}: each must be in 0..{10**MAX_DIGITS - 1} "
                         f"(no unary minus; at most {MAX_DIGITS} digits)")
    return numbers


@functools.lru_cache(maxsize=None)
def _table(numbers: tuple[int, ...]) -> dict[int, tuple[str, ...]]:
    """value -> sorted distinct strings over the sorted multiset `numbers` (cached: level 2
    has 495 multisets, each enumerated once per process)."""
    found: dict[int, set[str]] = {}
    for order in set(itertools.permutations(numbers)):
        for ops in itertools.product(OPERATORS, repeat=len(numbers) - 1):
            value = _fold(order, ops)
            if value is not None:
                found.setdefault(value, set()).add(_render(order, ops))
    return {v: tuple(sorted(s)) for v, s in found.items()}


def solutions(numbers: Sequence[int], target: int) -> list[str]:
    """Every distinct string that uses the multiset `numbers` once each and equals `target`
    (all permutations x operator tuples; repeated numbers give each string once), sorted."""
    return list(_table(tuple(sorted(_check_numbers(numbers)))).get(int(target), ()))


def random_success(numbers: Sequence[int], target: int) -> float:
    """The chance that `random_attempt(numbers, rng)` is correct: each distinct solution string
    is written by prod(c!) of the k! orders (c: the counts of repeated numbers)."""
    numbers = _check_numbers(numbers)
    orders = math.prod(math.factorial(c) for c in _counts(numbers).values())
    attempts = math.factorial(len(numbers)) * len(OPERATORS) ** (len(numbers) - 1)
    return len(solutions(numbers, target)) * orders / attempts


def _counts(numbers) -> dict[int, int]:
    counts: dict[int, int] = {}
    for n in numbers:
        counts[n] = counts.get(n, 0) + 1
    return counts


def random_attempt(numbers: Sequence[int], rng: random.Random) -> str:
    """A uniformly random well-formed attempt: the numbers in a random order, random operators
    (the warm-up's diverse targets; correct only by chance)."""
    order = list(_check_numbers(numbers))
    rng.shuffle(order)
    return _render(order, [rng.choice(OPERATORS) for _ in order[1:]])


# ----------------------------------------------------------------------------- scoring


class CountdownGrade(NamedTuple):
    """The grade of one response (`grade_countdown`)."""

    accuracy: float  # 1.0: well-formed, the numbers exactly once each, equal to the target
    format: float  # 1.0: a well-formed expression (whatever its numbers and value)
    extracted: str | None  # the expression text after stripping, None if empty
    status: str  # ok | no_answer | too_long | malformed | wrong_numbers | wrong_value


def response_expression(response: str) -> str:
    """The expression part of a response: one trailing stop marker removed (only when it is the
    very end of the text), then surrounding whitespace stripped."""
    for marker in STOP_MARKERS:
        if response.endswith(marker):
            response = response[: -len(marker)]
            break
    return response.strip()


def grade_countdown(response: str, numbers: Sequence[int], target: int) -> CountdownGrade:
    """Grades a response to the problem (numbers, target); see `countdown_accuracy`."""
    text = response_expression(response)
    if not text:
        return CountdownGrade(0.0, 0.0, None, "no_answer")
    if len(text) > MAX_CHARS:
        return CountdownGrade(0.0, 0.0, text[:MAX_CHARS], "too_long")
    parsed = parse_expression(text)
    if parsed is None:
        return CountdownGrade(0.0, 0.0, text, "malformed")
    value, used = parsed
    if sorted(used) != sorted(int(n) for n in numbers):
        return CountdownGrade(0.0, 1.0, text, "wrong_numbers")
    if value != int(target):
        return CountdownGrade(0.0, 1.0, text, "wrong_value")
    return CountdownGrade(1.0, 1.0, text, "ok")


def countdown_accuracy(response: str, numbers: Sequence[int], target: int) -> float:
    """1.0 iff the response (`response_expression`: a trailing `<|im_end|>` / `<|endoftext|>`
    removed, whitespace stripped) is a well-formed expression of at most MAX_CHARS characters
    that uses exactly the multiset `numbers`, once each, and equals `target`; else 0.0."""
    return grade_countdown(response, numbers, target).accuracy


# ----------------------------------------------------------------------------- answers the grader reads


def answer_key(numbers: Sequence[int], target: int) -> str:
    """The answer string the training loop hands the grader: `"3 5 7|22"`.

    The loop passes each grader only (response, answer, choices); a countdown answer needs the
    numbers as well as the target, so the records `countdown_source` gives the loop carry this
    key as their `answer` (`countdown_records` keep the bare target).
    """
    return " ".join(str(n) for n in numbers) + "|" + str(int(target))


def parse_answer_key(answer: str) -> tuple[tuple[int, ...], int]:
    """(numbers, target) of an `answer_key` string; ValueError naming it otherwise."""
    head, sep, tail = str(answer).partition("|")
    try:
        if not sep:
            raise ValueError
        return tuple(int(n) for n in head.split()), int(tail)
    except ValueError:
        raise ValueError(f"countdown answer {answer!r}: expected 'NUMBERS|TARGET' such as "
                         "'3 5 7|22' (the records of uecjax.data.countdown.countdown_source "
                         "carry it; countdown_records' bare targets cannot be graded)") from None


# ----------------------------------------------------------------------------- records


def problem_key(numbers: Sequence[int], target: int) -> str:
    """The canonical text of a problem: sorted numbers and the target (`2 3 5 to 11`)."""
    return " ".join(str(n) for n in sorted(numbers)) + f" to {int(target)}"


def _targets(numbers: tuple[int, ...], spec: Level) -> list[int]:
    """Targets of `spec` for the sorted multiset `numbers`, ascending."""
    out = []
    for value, strings in sorted(_table(numbers).items()):
        if value <= 0:
            continue
        if spec.max_solutions is not None and len(strings) > spec.max_solutions:
            continue
        if spec.max_success is not None and random_success(numbers, value) > spec.max_success:
            continue
        out.append(value)
    return out


def countdown_records(split: str = "train", num: int = 1000, *, seed: int = 0,
                      levels: tuple[int, ...] = (1, 2), heldout_percent: int = 20) -> list[Record]:
    """`num` distinct problems of `split` ("train" or "test"), levels drawn uniformly.

    Each problem draws its numbers (sorted in the prompt), then a target uniformly among the
    level's admissible values for them. Record: prompt `"3 5 7 to 22:"`, answer `"22"`,
    meta level / numbers / target / num_solutions (distinct solution strings) / success (the
    chance of a random attempt, `random_success`). The same arguments always give the same
    records. Raises ValueError if the levels hold fewer than `num` distinct problems for the
    split.
    """
    levels = tuple(levels)
    check_generator_args("countdown", split, levels, LEVELS, heldout_percent)
    if num < 0:
        raise ValueError(f"num={num}: must be >= 0")
    rng = seeded_rng(f"countdown/{seed}/{split}")

    def draw():
        level = rng.choice(levels)
        spec = LEVELS[level]
        numbers = tuple(sorted(rng.randint(spec.low, spec.high) for _ in range(spec.count)))
        targets = _targets(numbers, spec)
        if not targets:
            return None
        target = rng.choice(targets)
        key = problem_key(numbers, target)
        return key, key, lambda: Record(
            prompt=f"{' '.join(str(n) for n in numbers)} to {target}:", answer=str(target),
            id=record_id("countdown", level, key), source="countdown",
            meta={"level": level, "numbers": numbers, "target": target,
                  "num_solutions": len(_table(numbers)[target]),
                  "success": random_success(numbers, target)})

    return distinct_records(
        num, draw, split, heldout_percent,
        too_few=lambda found: (f"only {found} distinct {split!r} countdown problems found for "
                               f"levels={levels}; ask for fewer (num={num}) or add levels"))


def countdown_source(split: str = "train", num: int = 1000, **kwargs) -> RecordSource:
    """`countdown_records` as a source for `make_dataset`, with `answer_key` answers.

    The training loop and `uecjax.evaluate` hand the grader each record's `answer` only, so
    these records carry `"3 5 7|22"` there (`CountdownGrader` parses it); the rest of each
    record, meta included, is as `countdown_records` makes it.
    """
    records = [dataclasses.replace(r, answer=answer_key(r.meta["numbers"], r.meta["target"]))
               for r in countdown_records(split, num, **kwargs)]
    return RecordSource(records, name="countdown")
