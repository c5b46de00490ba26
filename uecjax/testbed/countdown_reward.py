"""The countdown accuracy on token ids, in jnp: jit- and vmap-able, static shapes.

    classes = jnp.asarray(token_classes(tokenizer))                      # [V], once
    acc = countdown_accuracy_batch(tokens, mask, numbers, num_numbers, targets, classes)  # [B]

The same function as the host's `uecjax.data.countdown.countdown_accuracy` on the decoded
response, so a loop that samples, scores and trains on the device needs no host round trip:
each token id maps to a class (`token_classes`: digit, operator, SPACE, STOP, OTHER) and a
`lax.scan` runs the host parser's state machine over the valid tokens, with the host's
overflow checks. Exact for character-level tokenizers (but for a stop marker spelled out in
characters at the very end); with a multi-character tokenizer a lower bound of the host's.
docs/DESIGN.md, "The compiled testbed".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from uecjax.data.countdown import DIGITS, MAX_CHARS, MAX_DIGITS, MAX_VALUE
from uecjax.tokenizer import stop_token_ids

# Token classes: 0-9 are the digits themselves.
PLUS, MINUS, TIMES, SPACE, STOP, OTHER = 10, 11, 12, 13, 14, 15
_FIRST = 0  # pending operator before the first number: none
_SENTINEL = -1  # padding of the sorted multisets (read numbers are >= 0)


def token_classes(tokenizer) -> np.ndarray:
    """[len(tokenizer)] int32: each token id's class (module docstring) from its decoded text."""
    stops = set(stop_token_ids(tokenizer))
    symbols = {"+": PLUS, "-": MINUS, "*": TIMES}
    classes = np.full(len(tokenizer), OTHER, np.int32)
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if i in stops:
            classes[i] = STOP
        elif len(text) == 1 and text in DIGITS:
            classes[i] = int(text)
        elif text in symbols:
            classes[i] = symbols[text]
        elif text and text.isspace():
            classes[i] = SPACE
    return classes


def _finish(n, pending, term, total):
    """The host fold's step for number `n` after operator `pending`: (term, total, overflow)."""
    mul_over = (n > 0) & (jnp.abs(term) > MAX_VALUE // jnp.maximum(n, 1))
    added = total + term  # both within MAX_VALUE: no int32 wrap
    add_over = jnp.abs(added) > MAX_VALUE
    is_mul, is_add = pending == TIMES, (pending == PLUS) | (pending == MINUS)
    new_term = jnp.where(is_mul, term * n, jnp.where(pending == MINUS, -n, n))
    new_total = jnp.where(is_add, added, total)
    return new_term, new_total, (is_mul & mul_over) | (is_add & add_over)


def countdown_accuracy_jnp(response_tokens, response_mask, numbers, num_numbers, target,
                           classes) -> jax.Array:
    """1.0 / 0.0 (float32 scalar): the host's `countdown_accuracy` on the decoded response.

    response_tokens [R] int32 and response_mask [R] (nonzero: the token is part of the
    response, in order); numbers [K] int32 of which the first num_numbers (<= K) are the
    problem's, the rest padding; target int32 scalar; classes [V] from `token_classes`
    (ids outside 0..V-1 are OTHER).
    """
    tokens = jnp.asarray(response_tokens, jnp.int32)
    valid = jnp.asarray(response_mask) > 0
    numbers = jnp.asarray(numbers, jnp.int32)
    classes = jnp.asarray(classes, jnp.int32)
    R, K, V = tokens.shape[0], numbers.shape[0], classes.shape[0]
    cls = jnp.where((tokens >= 0) & (tokens < V), classes[jnp.clip(tokens, 0, V - 1)], OTHER)
    index = jnp.arange(R)
    last = jnp.max(jnp.where(valid, index, -1))
    active = valid & ~((index == last) & (cls == STOP))  # a final stop token ends the response
    too_long = jnp.sum(active & (cls <= TIMES)) > MAX_CHARS
    slots = jnp.arange(K)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731

    def step(carry, inputs):
        c, on = inputs
        started, trail, bad, num, nlen, pending, term, total, count, buf = carry
        is_digit, is_op, is_space = c <= 9, (c >= PLUS) & (c <= TIMES), c == SPACE
        # A digit extends the current number.
        digit_bad = trail | ((nlen >= 1) & (num == 0)) | (nlen >= MAX_DIGITS)
        digit_num = jnp.where(nlen < MAX_DIGITS, num * 10 + c, num)
        # An operator ends the current number (none: a leading or doubled operator).
        f_term, f_total, f_over = _finish(num, pending, term, total)
        op_bad = trail | (nlen == 0) | f_over
        op_buf = jnp.where(slots == count, num, buf)
        new = (
            started | is_digit | is_op,
            trail | (is_space & started),
            bad | jnp.where(is_digit, digit_bad, jnp.where(is_op, op_bad, ~is_space)),
            jnp.where(is_digit, digit_num, jnp.where(is_op, 0, num)),
            jnp.where(is_digit, nlen + 1, jnp.where(is_op, 0, nlen)),
            jnp.where(is_op, c, pending),
            jnp.where(is_op, f_term, term),
            jnp.where(is_op, f_total, total),
            jnp.where(is_op, count + 1, count),
            jnp.where(is_op, op_buf, buf),
        )
        return jax.tree.map(lambda a, b: jnp.where(on, a, b), new, carry), None

    init = (jnp.bool_(False), jnp.bool_(False), jnp.bool_(False), i32(0), i32(0), i32(_FIRST),
            i32(0), i32(0), i32(0), jnp.full((K,), _SENTINEL, jnp.int32))
    (_, _, bad, num, nlen, pending, term, total, count, buf), _ = lax.scan(
        step, init, (cls, active))
    # The last number, then the last term into the sum.
    term, total, over = _finish(num, pending, term, total)
    value = total + term
    buf = jnp.where(slots == count, num, buf)
    count = count + 1
    bad = bad | too_long | (nlen == 0) | over | (jnp.abs(value) > MAX_VALUE)
    num_numbers = jnp.asarray(num_numbers, jnp.int32)
    read = jnp.sort(jnp.where(slots < count, buf, _SENTINEL))
    given = jnp.sort(jnp.where(slots < num_numbers, numbers, _SENTINEL))
    same = (count == num_numbers) & jnp.all(read == given)
    return jnp.where(~bad & same & (value == jnp.asarray(target, jnp.int32)), 1.0, 0.0).astype(
        jnp.float32)


# Rows of a batch: tokens [B, R], mask [B, R], numbers [B, K], num_numbers [B], target [B];
# classes shared.
countdown_accuracy_batch = jax.jit(jax.vmap(countdown_accuracy_jnp, in_axes=(0, 0, 0, 0, 0, None)))
