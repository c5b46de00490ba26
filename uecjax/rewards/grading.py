r"""Grading one response against its reference: the last `\boxed{}` answer, the format
reward and the answer comparison (ALGORITHMS.md section 1). Pure and in-process;
`uecjax.rewards.grader` runs the symbolic comparison in worker processes.

Reward: r = w_f * format + (1 - w_f) * accuracy, w_f = 0.1 by default, accuracy and format in
{0, 1}. Accuracy: the content of the LAST `\boxed{...}` (braces matched) compared with the
reference by math-verify (symbolic and numeric equivalence); with multiple choices
(Geometry3K) a bare letter stands for its choice's text. Format: `<think>THINKING</think>ANSWER`
with one think block and a non-empty boxed answer (`format_reward`). Details in docs/DESIGN.md.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

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
    """1.0 if `response` follows the `<think>...</think>` + `\\boxed{}` rule (docs/DESIGN.md,
    "Rewards")."""
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
