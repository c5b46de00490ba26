"""The countdown task: solutions, records and splits, the host grader, and the jnp accuracy on
token ids against the host on the decoded strings."""

import itertools
import random

import jax
import numpy as np
import pytest

from uecjax.data.countdown import (LEVELS, MAX_VALUE, answer_key, countdown_accuracy,
                                   countdown_records, countdown_source, evaluate_expression,
                                   parse_answer_key, problem_key, random_attempt, random_success,
                                   solutions)
from uecjax.data.demo import split_of
from uecjax.rewards.grader import CountdownGrader, make_grader
from uecjax.testbed.countdown_reward import (OTHER, SPACE, STOP, countdown_accuracy_batch,
                                             countdown_accuracy_jnp, token_classes)
from uecjax.tokenizer import char_tokenizer

TOK = char_tokenizer()
CLASSES = token_classes(TOK)
K, R = 6, 32  # numbers buffer and response width of the jnp checks
single = jax.jit(countdown_accuracy_jnp)


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


def special(token: str) -> int:
    return TOK.convert_tokens_to_ids(token)


STOP_ID, EOT_ID, THINK_ID, PAD_ID = (special(t) for t in
                                     ("<|im_end|>", "<|endoftext|>", "<think>", "<pad>"))


def host_score(tokens, mask, numbers, target) -> float:
    """The host accuracy on the decoded masked ids, as the training loop decodes them."""
    text = TOK.decode([int(t) for t, m in zip(tokens, mask) if m], skip_special_tokens=False)
    return countdown_accuracy(text, numbers, target)


def row(tokens, masked_tail=()):
    """[R] tokens and mask: `tokens` valid, then `masked_tail` present but masked out."""
    t = np.full(R, PAD_ID, np.int32)
    m = np.zeros(R, np.int32)
    everything = list(tokens) + list(masked_tail)
    assert len(everything) <= R
    t[:len(everything)] = everything
    m[:len(tokens)] = 1
    return t, m


def padded(numbers):
    out = np.zeros(K, np.int32)
    out[:len(numbers)] = numbers
    return out


def jnp_score(tokens, mask, numbers, target) -> float:
    return float(single(tokens, mask, padded(numbers), len(numbers), target, CLASSES))


# ----------------------------------------------------------------------------- host task


def brute_force(numbers, target):
    out = set()
    for order in itertools.permutations(numbers):
        for ops in itertools.product("+-*", repeat=len(numbers) - 1):
            text = str(order[0]) + "".join(o + str(n) for o, n in zip(ops, order[1:]))
            if eval(text) == target:  # trusted: built here from digits and + - *
                out.add(text)
    return sorted(out)


@pytest.mark.parametrize("numbers,target", [((3, 5, 7), 22), ((2, 2, 3), 7), ((1, 3, 4, 8), 3),
                                            ((2, 5, 5, 9), 41), ((6, 6, 6, 6), 36),
                                            ((1, 2, 3), 100)])
def test_solutions_match_brute_force(numbers, target):
    assert solutions(numbers, target) == brute_force(numbers, target)
    assert solutions(reversed(numbers), target) == solutions(numbers, target)


def test_evaluate_expression():
    rng = random.Random(0)
    for _ in range(300):  # well-formed strings: Python's precedence is the same
        nums = [rng.randint(1, 999) for _ in range(rng.randint(1, 5))]
        text = random_attempt(nums, rng)
        value = eval(text)  # trusted: built here from digits and + - *
        assert evaluate_expression(text) == (value if abs(value) <= MAX_VALUE else None)
    assert evaluate_expression("35+7") == 42 and evaluate_expression("0") == 0
    assert evaluate_expression("9999*9999") == 99980001
    assert evaluate_expression("9999*9999*10") == 999800010 <= MAX_VALUE
    assert evaluate_expression("9999*9999*10-9999*9999*10") == 0
    for bad in ("", "07", "3+07", "12345", "-3+5", "3--5", "3+", "+3", "3 +5", "3+5 ", "(3)",
                "3/5", "\u0663+5", "\u00b2+1", "9999*9999*11",  # product beyond MAX_VALUE
                "9999*9999*10+9999*9999*10"):  # sum beyond it
        assert evaluate_expression(bad) is None, bad


def test_random_attempt_and_success():
    rng = random.Random(1)
    attempts = {random_attempt((3, 5, 7), rng) for _ in range(2000)}
    assert len(attempts) == 54  # every order x operator pair
    assert all(sorted(int(x) for x in a.replace("*", "+").replace("-", "+").split("+"))
               == [3, 5, 7] for a in attempts)
    assert random_success((3, 5, 7), 22) == 4 / 54
    # {1, 1, 1, 2}: each distinct string is written by 3! orders of the 1s.
    assert random_success((1, 1, 1, 2), 2) == len(solutions((1, 1, 1, 2), 2)) * 6 / 648


def test_records_deterministic_split_and_levels():
    train = countdown_records("train", 300, seed=0)
    assert train == countdown_records("train", 300, seed=0)
    assert train != countdown_records("train", 300, seed=1)
    test = countdown_records("test", 100, seed=1)
    keys = lambda rs: {problem_key(r.meta["numbers"], r.meta["target"]) for r in rs}  # noqa: E731
    assert len(keys(train)) == 300 and not keys(train) & keys(test)
    assert all(split_of(k, 20) == "train" for k in keys(train))
    assert {r.meta["level"] for r in train} == {1, 2}
    for r in train + test:
        numbers, target, level = r.meta["numbers"], r.meta["target"], r.meta["level"]
        spec = LEVELS[level]
        assert len(numbers) == spec.count and all(spec.low <= n <= spec.high for n in numbers)
        assert r.prompt == " ".join(map(str, numbers)) + f" to {target}:" and r.answer == str(target)
        assert r.id.startswith(f"countdown-{level}-") and r.source == "countdown"
        assert target > 0 and r.meta["num_solutions"] == len(solutions(numbers, target)) >= 1
        if level == 2:
            assert 1 <= r.meta["num_solutions"] <= spec.max_solutions
            assert r.meta["success"] <= spec.max_success
    source = countdown_source("test", 5, seed=1)
    assert [r.answer for r in source] == [answer_key(r.meta["numbers"], r.meta["target"])
                                          for r in test[:5]]
    assert parse_answer_key(source[0].answer) == (test[0].meta["numbers"], test[0].meta["target"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="dev"), "split='dev'"), (dict(levels=(3,)), "levels=\\(3,\\)"),
    (dict(levels=()), "levels=\\(\\)"), (dict(heldout_percent=0), "heldout_percent=0"),
    (dict(split="test", num=400, levels=(1,)), "only 288 distinct 'test' countdown problems"),
])
def test_records_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        countdown_records(**{"split": "train", "num": 10, **kwargs})


def test_parse_answer_key_errors():
    assert parse_answer_key("3 5 7|22") == ((3, 5, 7), 22)
    for bad in ("22", "3 5 x|22", "3 5 7|"):
        with pytest.raises(ValueError, match="NUMBERS\\|TARGET"):
            parse_answer_key(bad)


def test_grader():
    with make_grader("countdown", format_weight=0.1) as grader:
        assert isinstance(grader, CountdownGrader)
        future = grader.grade_batch(["3*5+7", " 7+5*3\n<|im_end|>", "3+5+7", "35+7", "3*5+",
                                     "", "1+" * 40 + "1"],
                                    ["3 5 7|22"] * 5 + ["3 5 7|22", "1|1"], [()] * 7)
        assert future.done()
        rewards = future.result()
    assert [r.accuracy for r in rewards] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert [r.format for r in rewards] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r.status for r in rewards] == ["ok", "ok", "wrong_value", "wrong_numbers",
                                           "malformed", "no_answer", "too_long"]
    assert rewards[0].reward == 1.0 and rewards[2].reward == pytest.approx(0.1)
    assert rewards[1].extracted == "7+5*3" and rewards[5].extracted is None
    assert grader.stats["graded"] == 7
    with pytest.raises(RuntimeError, match="after close"):
        grader.grade_batch(["1"], ["1|1"])
    with pytest.raises(ValueError, match="NUMBERS\\|TARGET"):
        CountdownGrader().grade(["3*5+7"], ["22"])
    with pytest.raises(ValueError, match="2 responses, 1 answers"):
        CountdownGrader().grade(["1", "1"], ["1|1"])


# ----------------------------------------------------------------------------- jnp == host


def test_token_classes():
    assert [CLASSES[i] for i in ids("0123456789+-* \n")] == list(range(10)) + [10, 11, 12] + [SPACE] * 2
    assert CLASSES[STOP_ID] == CLASSES[EOT_ID] == STOP
    assert CLASSES[THINK_ID] == CLASSES[PAD_ID] == CLASSES[ids("a")[0]] == CLASSES[ids("/")[0]] == OTHER
    assert CLASSES.shape == (len(TOK),) and CLASSES.dtype == np.int32


PROBLEMS = [((3, 5, 7), 22), ((1, 3, 5, 7), 22), ((35, 7), 42), ((0, 3, 5), 15), ((3, 4, 5), 13),
            ((9999, 1), 10000), ((9999, 9999, 10), 999800010), ((9999, 9999, 11), 1099780011),
            ((6, 6), 12)]

# (numbers, target, valid pieces, masked tail, expected); pieces: text, or a special token id.
ADVERSARIAL = [
    ((3, 5, 7), 22, [], [], 0.0),  # empty
    ((3, 5, 7), 22, [STOP_ID], [], 0.0),  # only the stop token
    ((3, 5, 7), 22, [" \n "], [], 0.0),  # only whitespace
    ((3, 5, 7), 22, ["3*5+7"], [], 1.0),
    ((3, 5, 7), 22, ["3*5+7", STOP_ID], [], 1.0),
    ((3, 5, 7), 22, ["7+5*3", EOT_ID], [], 1.0),
    ((3, 5, 7), 22, [" \n3*5+7 ", STOP_ID], [], 1.0),  # surrounding whitespace
    ((3, 5, 7), 22, ["3*5+7", STOP_ID, " "], [], 0.0),  # text after the stop
    ((3, 5, 7), 22, ["3*5+7", STOP_ID, STOP_ID], [], 0.0),
    ((3, 5, 7), 22, ["3+5+7", STOP_ID], [], 0.0),  # wrong value
    ((3, 4, 5), 13, ["3+5+5"], [], 0.0),  # a number reused, one missing
    ((3, 4, 5), 13, ["4+4+5"], [], 0.0),
    ((1, 3, 5, 7), 22, ["3*5+7"], [], 0.0),  # a number missing
    ((1, 3, 5, 7), 22, ["3*5+7*1"], [], 1.0),
    ((3, 5, 7), 22, ["3*5+7+0"], [], 0.0),  # an extra number
    ((3, 5, 7), 42, ["35+7"], [], 0.0),  # concatenated digits are one number
    ((35, 7), 42, ["35+7"], [], 1.0),
    ((35, 7), 42, ["3", "5+7"], [], 1.0),
    ((3, 5, 7), 22, ["+3*5+7"], [], 0.0),  # leading operator
    ((3, 5, 7), 22, ["3*5+7+"], [], 0.0),  # trailing operator
    ((3, 5, 7), 22, ["3*5++7"], [], 0.0),  # double operator
    ((3, 5, 7), 8, ["3*-5+7"], [], 0.0),
    ((3, 5, 7), 32, ["-3+5*7"], [], 0.0),  # unary minus
    ((3, 5, 7), 22, ["3*5", STOP_ID, "+7"], [], 0.0),  # stop token in the middle
    ((3, 5, 7), 22, ["3*5+7", STOP_ID], ["garbage"], 1.0),  # text after the stop, masked
    ((3, 5, 7), 22, ["3*5+7", STOP_ID, "garbage"], [], 0.0),  # ... and unmasked
    ((3, 5, 7), 22, ["3*5+7"], ["+1"], 1.0),
    ((3, 5, 7), 22, ["3*5+7abc"], [], 0.0),  # a valid expression, then garbage
    ((3, 5, 7), 22, ["3*5+7 =22"], [], 0.0),
    ((3, 5, 7), 22, ["3 * 5 + 7"], [], 0.0),  # spaces inside
    ((3, 5, 7), 22, [THINK_ID, "3*5+7"], [], 0.0),  # another special token
    ((3, 5, 7), 22, ["3*5+07"], [], 0.0),  # zero-padded
    ((0, 3, 5), 15, ["3*5+0"], [], 1.0),  # 0 alone is a number
    ((0, 3, 5), 15, ["3*5+00"], [], 0.0),
    ((0, 3, 5), 15, ["+3*5"], [], 0.0),  # a leading operator does not stand for a 0
    ((0, 3, 5), 8, ["3++5"], [], 0.0),  # nor does a doubled one
    ((3, 5, 7), 22, ["3*5+77777777777777"], [], 0.0),  # a long digit run
    ((9999, 1), 10000, ["9999+1"], [], 1.0),  # four digits
    ((9999, 1), 10000, ["10000"], [], 0.0),  # five digits
    ((9999, 9999, 10), 999800010, ["9999*9999*10"], [], 1.0),  # below MAX_VALUE
    ((9999, 9999, 11), 9999 * 9999 * 11, ["9999*9999*11"], [], 0.0),  # a product beyond it
    ((9999, 9999, 10, 9999, 9999, 10), 2 * 999800010, ["9999*9999*10+9999*9999*10"], [],
     0.0),  # a sum beyond it
    ((9999, 9999, 10, 9999, 9999, 10), 0, ["9999*9999*10-9999*9999*10"], [], 1.0),
    ((6, 6), 12, ["6+6"], [], 1.0),
    ((6, 6), 12, ["6*2"], [], 0.0),
]


def encode_pieces(pieces):
    return [t for p in pieces for t in (ids(p) if isinstance(p, str) else [p])]


@pytest.mark.parametrize("case", range(len(ADVERSARIAL)))
def test_adversarial_cases(case):
    numbers, target, pieces, tail, expected = ADVERSARIAL[case]
    tokens, mask = row(encode_pieces(pieces), encode_pieces(tail))
    assert host_score(tokens, mask, numbers, target) == expected
    assert jnp_score(tokens, mask, numbers, target) == expected


def random_rows(n: int, seed: int):
    """Random token rows of random lengths over digits (mostly the problem's), operators,
    whitespace, other characters and special tokens; a third are mutated attempts, so that
    correct ones occur."""
    rng = random.Random(seed)
    problems = [(r.meta["numbers"], r.meta["target"]) for r in countdown_records("test", 40, seed=seed)]
    problems += PROBLEMS
    others = ids("abx=().,/<|>") + [THINK_ID, PAD_ID, special("<|im_start|>")]
    rows, meta = [], []
    for _ in range(n):
        numbers, target = rng.choice(problems)
        if rng.random() < 0.35:
            text = list(random_attempt(numbers, rng) if rng.random() < 0.6
                        else rng.choice(solutions(numbers, target) or ["1"]))
            for _ in range(rng.choice([0, 0, 1, 2])):  # mutate a character
                i = rng.randrange(len(text) + 1)
                what = rng.random()
                if what < 0.4 and i < len(text):
                    del text[i]
                else:
                    text.insert(i, rng.choice("0123456789+-* " + "a"))
            tokens = ids("".join(text)) if text else []
            if rng.random() < 0.7:
                tokens.append(rng.choice([STOP_ID, EOT_ID]))
        else:
            digits = "".join(str(x) for x in numbers)
            pool = ([ids(c)[0] for c in digits] * 3 + ids("0123456789+-*+-* \n")
                    + others + [STOP_ID, EOT_ID])
            tokens = [rng.choice(pool) for _ in range(rng.randint(0, R))]
        tokens = tokens[:R]
        tail = [rng.choice(others + ids("123+")) for _ in range(rng.randint(0, R - len(tokens)))]
        rows.append(row(tokens, tail))
        meta.append((numbers, target))
    return rows, meta


def batch_arrays(rows, meta):
    tokens = np.stack([t for t, _ in rows])
    mask = np.stack([m for _, m in rows])
    numbers = np.stack([padded(n) for n, _ in meta])
    counts = np.array([len(n) for n, _ in meta], np.int32)
    targets = np.array([t for _, t in meta], np.int32)
    return tokens, mask, numbers, counts, targets


def test_random_strings_host_equals_jnp():
    rows, meta = random_rows(2000, seed=0)
    got = np.asarray(countdown_accuracy_batch(*batch_arrays(rows, meta), CLASSES))
    want = np.array([host_score(t, m, n, g) for (t, m), (n, g) in zip(rows, meta)])
    mismatches = [(TOK.decode([int(x) for x, y in zip(t, m) if y], skip_special_tokens=False), n, g)
                  for (t, m), (n, g), a, b in zip(rows, meta, got, want) if a != b]
    assert not mismatches, mismatches[:10]
    assert 50 <= want.sum() <= 1950, want.sum()  # both outcomes are well represented


def test_every_solution_scores_one():
    problems = [(r.meta["numbers"], r.meta["target"])
                for lv in (1, 2) for r in countdown_records("test", 4, seed=3, levels=(lv,))]
    problems += [((3, 5, 7), 22), ((2, 2, 3), 7), ((6, 6, 6, 6), 36)]
    rows, meta = [], []
    for numbers, target in problems:
        for text in solutions(numbers, target):
            rows.append(row(ids(text) + [STOP_ID]))
            meta.append((numbers, target))
    assert len(rows) > 40
    got = np.asarray(countdown_accuracy_batch(*batch_arrays(rows, meta), CLASSES))
    assert got.tolist() == [1.0] * len(rows)
    assert all(host_score(t, m, n, g) == 1.0 for (t, m), (n, g) in zip(rows, meta))


def test_batch_equals_per_row_calls():
    rows, meta = random_rows(12, seed=5)
    rows[0] = row(ids("3*5+7") + [STOP_ID])
    meta[0] = ((3, 5, 7), 22)
    arrays = batch_arrays(rows, meta)
    got = np.asarray(countdown_accuracy_batch(*arrays, CLASSES))
    per_row = [float(single(*(a[i] for a in arrays), CLASSES)) for i in range(len(rows))]
    assert got.tolist() == per_row and got.dtype == np.float32 and got[0] == 1.0
