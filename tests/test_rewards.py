"""Rewards: extraction, format rule, math-verify grading (real Geometry3K answers), the
letter/choice rule, and time bounds on adversarial output."""

import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uecjax.rewards.grader import RewardGrader, grade_batch
from uecjax.rewards.grading import brace_depth, extract_boxed, format_reward, grade_answer

GEO3K = Path(__file__).parent / "data" / "geometry3k" / "samples-00000-of-00001.parquet"
TIMEOUT_S = 1.5
WORKERS = 2


@pytest.fixture(scope="module")
def grader():
    with RewardGrader(num_workers=WORKERS, timeout_s=TIMEOUT_S) as g:
        yield g


@pytest.fixture(scope="module")
def geo3k():
    return pq.read_table(GEO3K, columns=["answer", "choices", "ground_truth"]).to_pylist()


def good(answer: str) -> str:
    return f"<think>Angles add up, so solve for it.</think> The answer is \\boxed{{{answer}}}."


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}", "5"),
    (r"\boxed{1} then \boxed{2}", "2"),  # the last box
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\frac{ 2 \sqrt{ 2 } }{5}} done", r"\frac{ 2 \sqrt{ 2 } }{5}"),
    (r"\boxed {  7 }", "7"),  # space before the brace, content stripped
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
    (r"\boxed{1} and \boxed{2", None),  # unbalanced last box: no answer (no fallback)
    (r"\boxed{\frac{1}{2}", None),
    ("no box at all", None),
    (r"\boxed{" + "1" * 2000 + "}", None),  # longer than MAX_ANSWER_CHARS
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_brace_depth():
    assert brace_depth(r"\frac{\sqrt{2}}{3}") == 2
    assert brace_depth(r"\{\{\}\}") == 0


# ----------------------------------------------------------------------------- format rule


@pytest.mark.parametrize("response, expected", [
    (r"<think>reason</think> so \boxed{5}", 1.0),
    (r"  <think>reason</think>\boxed{5}  ", 1.0),  # surrounding whitespace ignored
    (r"<think></think>\boxed{5}", 1.0),  # empty thinking is allowed
    (r"<think>a</think> \boxed{\frac{1}{2}} because", 1.0),  # text after the box is allowed
    (r"reason</think>\boxed{5}", 0.0),  # must start with <think>
    (r"hi <think>reason</think>\boxed{5}", 0.0),
    (r"<think>reason \boxed{5}</think> done", 0.0),  # the box must follow </think>
    (r"<think>reason</think> 5", 0.0),  # no box
    (r"<think>reason</think> \boxed{}", 0.0),  # empty box
    (r"<think>reason</think> \boxed{5", 0.0),  # unbalanced box
    (r"<think>a</think><think>b</think>\boxed{5}", 0.0),  # one think block only
    (r"<think>a</think> \boxed{5} </think>", 0.0),
])
def test_format_rule(response, expected):
    assert format_reward(response) == expected


def test_format_rule_with_think_prefilled_by_the_template():
    assert format_reward(r"reason</think> \boxed{5}", think_prefilled=True) == 1.0
    assert format_reward(r"<think>reason</think> \boxed{5}", think_prefilled=True) == 0.0


# ----------------------------------------------------------------------------- grading


def test_real_geometry3k_answers(grader, geo3k):
    """Each of the 10 real answers: correct text, its letter, wrong choices."""
    responses, answers, choices, expected = [], [], [], []
    for row in geo3k:
        letter = row["ground_truth"]
        correct = ord(letter) - ord("A")
        assert row["choices"][correct] == row["answer"]
        wrong = (correct + 1) % len(row["choices"])
        for response, acc in [(good(row["answer"]), 1.0),  # spaced LaTeX as in the data
                              (good(letter), 1.0),
                              (good(f"({letter})"), 1.0),
                              (good(row["choices"][wrong]), 0.0),
                              (good("ABCD"[wrong]), 0.0)]:
            responses.append(response)
            answers.append(row["answer"])
            choices.append(row["choices"])
            expected.append(acc)
    rewards = grader.grade(responses, answers, choices)
    assert [r.accuracy for r in rewards] == expected
    for r, acc in zip(rewards, expected):
        assert r.format == 1.0
        assert r.reward == pytest.approx(0.1 + 0.9 * acc)
    assert rewards[0].reward == 1.0


@pytest.mark.parametrize("pred, gold, equal", [
    (r"5\sqrt3", r"5 \sqrt { 3 }", True),
    (r"5\sqrt{3}", r"5 \sqrt { 3 }", True),
    (r"\sqrt{75}", r"5 \sqrt { 3 }", True),  # symbolic
    ("7.5", r"\frac{15}{2}", True),  # numeric
    (r"\dfrac{15}{2}", "7.5", True),
    (r"\frac{2\sqrt2}{5}", r"\frac { 2 \sqrt { 2 } } { 5 }", True),
    (r"0.4\sqrt{2}", r"\frac { 2 \sqrt { 2 } } { 5 }", True),
    ("13.5", r"\frac{27}{2}", True),
    (r"120^\circ", "120", True),
    ("x = 9", "9", True),
    ("80.0", "80", True),
    (r"5\sqrt{2}", r"5 \sqrt { 3 }", False),
    ("7.4", r"\frac{15}{2}", False),
    ("x", "9", False),
])
def test_equivalences(grader, pred, gold, equal):
    reward = grader.grade([good(pred)], [gold])[0]
    assert reward.accuracy == float(equal), reward
    assert grade_answer(pred, gold) == equal  # the same rule, in-process


def test_choice_text_and_letter_forms(grader):
    choices = ["5", r"5 \sqrt { 2 }", r"5 \sqrt { 3 }", "10"]
    gold = choices[2]
    preds = ["C", "(C)", "C.", r"\text{C}", r"5\sqrt{3}", "B", "E", r"\text{B}"]
    got = [r.accuracy for r in grader.grade([good(p) for p in preds], [gold] * 8, [choices] * 8)]
    assert got == [1, 1, 1, 1, 1, 0, 0, 0]
    # Without choices a letter is just a symbol.
    assert grader.grade([good("C")], [gold])[0].accuracy == 0.0
    # A reference answer stored as the letter accepts the letter and the choice text.
    got = grader.grade([good("C"), good(r"5\sqrt3"), good("10")], ["C"] * 3, [choices] * 3)
    assert [r.accuracy for r in got] == [1, 1, 0]


def test_reward_mixes_format_and_accuracy(grader):
    r = grader.grade([r"\boxed{3}", r"<think>t</think>\boxed{4}", "3"], ["3", "3", "3"])
    assert [(x.accuracy, x.format) for x in r] == [(1, 0), (0, 1), (0, 0)]
    assert [x.reward for x in r] == pytest.approx([0.9, 0.1, 0.0])
    r = grader.grade([r"\boxed{3}"], ["3"], format_weight=0.5)[0]
    assert r.reward == 0.5
    with pytest.raises(ValueError, match="format_weight"):
        grader.grade_batch(["x"], ["3"], format_weight=1.5)
    with pytest.raises(ValueError, match="aligned"):
        grader.grade_batch(["x", "y"], ["3"])


def test_model_output_is_never_executed(grader, tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    rewards = grader.grade([good(code), good(f"eval(\"{code}\")")], ["1", "1"])
    assert [r.accuracy for r in rewards] == [0.0, 0.0]
    assert not marker.exists()


def test_grade_batch_is_asynchronous(grader):
    start = time.monotonic()
    future = grade_batch([good(r"9^{9^{9}}"), good("2")], ["5", "2"], grader=grader)
    assert time.monotonic() - start < 0.5  # returned before the slow answer was graded
    rewards = future.result(timeout=10 * TIMEOUT_S)
    assert [r.accuracy for r in rewards] == [0.0, 1.0]


# ----------------------------------------------------------------------------- adversarial


def bound(n: int) -> float:
    """Wall time allowed for n answers that all hit the deadline, plus start-up slack."""
    return TIMEOUT_S * math.ceil(n / WORKERS) + 3.0


def test_huge_and_unbalanced_inputs_are_cheap(grader):
    """Decided in the caller, with no parser: must be fast even for megabytes."""
    cases = [
        ("x" * 5_000_000 + r"\boxed{5}", 1.0, "ok"),
        (r"\boxed{" + "{" * 5_000, 0.0, "too_long"),  # unbalanced, no close within the cap
        (r"\boxed{" + "{" * 1_000_000, 0.0, "no_answer"),  # the box is before the searched tail
        (r"\boxed{5" + "}" * 100_000, 1.0, "ok"),  # extra closing braces after the box
        ("}" * 1_000_000 + "{" * 1_000_000, 0.0, "no_answer"),
        (r"\boxed{" * 200_000 + "5" + "}" * 200_000, 0.0, "no_answer"),  # tail: only braces
        (r"\boxed{" + "{" * 400 + "5" + "}" * 400 + "}", 0.0, "too_deep"),  # deep but short
        (r"\boxed{" + "1" * 100_000 + "}", 0.0, "too_long"),
        (r"\boxed{$$}", 0.0, "no_answer"),
    ]
    start = time.monotonic()
    rewards = grader.grade([c[0] for c in cases], ["5"] * len(cases))
    assert time.monotonic() - start < 3.0
    assert [(r.accuracy, r.status) for r in rewards] == [(c[1], c[2]) for c in cases]


def test_pathological_math_times_out_within_the_bound(grader):
    towers = [r"10^{10^{10^{10}}}", r"9^{9^{9}}", r"(10^{10})!", r"99999999999999!",
              r"2^{2^{2^{2^{2^{2}}}}}", r"\binom{10^{10}}{10^{9}}"]
    start = time.monotonic()
    rewards = grader.grade([good(t) for t in towers], ["5"] * len(towers))
    elapsed = time.monotonic() - start
    assert [r.accuracy for r in rewards] == [0.0] * len(towers)
    assert {r.status for r in rewards} <= {"timeout", "error"}
    assert elapsed < bound(len(towers)), elapsed
    # The workers are still (or again) usable afterwards.
    assert grader.grade([good(r"\frac{15}{2}")], ["7.5"])[0].accuracy == 1.0


def test_stuck_worker_is_killed_and_replaced():
    """With the in-worker soft timeout off, only the hard deadline (kill) can end the work."""
    with RewardGrader(num_workers=1, timeout_s=1.0, soft_timeout_s=0) as g:
        g.grade([good("1.0")], ["1"])  # the worker is up
        start = time.monotonic()
        stuck = g.grade([good(r"10^{10^{10^{10}}}")], ["5"])[0]
        elapsed = time.monotonic() - start
        assert (stuck.accuracy, stuck.status) == (0.0, "timeout")
        assert elapsed < 1.0 + 1.5, elapsed  # the deadline, plus slack for a loaded machine
        assert g.grade([good(r"\frac{15}{2}")], ["7.5"])[0].accuracy == 1.0  # the replacement
        assert g.stats["timeouts"] == 1 and g.stats["restarts"] == 1


def test_worker_killed_from_outside_scores_zero_and_is_replaced():
    """A worker that dies mid-answer (say, the kernel's OOM killer) costs that answer only."""
    with RewardGrader(num_workers=1, timeout_s=30.0, soft_timeout_s=0) as g:
        g.grade([good("1.0")], ["1"])  # the worker is up
        future = g.grade_batch([good(r"10^{10^{10^{10}}}")], ["5"])
        time.sleep(0.3)
        g._workers[0].proc.kill()
        assert future.result(timeout=10)[0].status == "crashed"
        assert g.grade([good("0.5")], [r"\frac{1}{2}"])[0].accuracy == 1.0
        assert g.stats["crashes"] == 1 and g.stats["restarts"] == 1
