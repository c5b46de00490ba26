"""Clip-Cov / KL-Cov token selection vs numpy and hand-built cases (section 7)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.objectives import clip_cov, kl_cov, kl_cov_mask, token_cov


def _numpy_cov(logp, adv, mask):
    v = mask > 0
    return (adv - adv[v].mean()) * (logp - logp[v].mean())


def _batch(B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.0, 1.5, size=(B, T)).astype(np.float32)
    adv = np.repeat(rng.normal(0, 1.5, size=(B, 1)), T, 1).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) < 0.75).astype(np.float32)
    mask[1] = 0.0  # empty row
    # off-mask tokens that would win every selection if masking were ignored
    logp[mask == 0] = 50.0
    adv[mask == 0] = 50.0
    return logp, adv, mask


def test_token_cov_matches_numpy_and_has_no_gradient():
    logp, adv, mask = _batch()
    np.testing.assert_allclose(token_cov(logp, adv, mask), _numpy_cov(logp, adv, mask), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda lp: jnp.sum(token_cov(lp, adv, mask)))(logp)
    np.testing.assert_array_equal(g, 0.0)


def test_kl_cov_mask_hand_built():
    # valid tokens: logp centred at 0, adv centred at 0, so Cov = adv * logp
    logp = np.array([[1.0, -1.0, 2.0, 9.0], [0.5, -2.5, 0.0, 0.0]], np.float32)
    adv = np.array([[1.0, 1.0, 1.0, 9.0], [-1.5, -1.5, 0.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
    # Cov: [[1, -1, 2, (masked: huge)], [-0.75, 3.75, -, -]]
    np.testing.assert_allclose(token_cov(logp, adv, mask)[mask > 0], [1, -1, 2, -0.75, 3.75], rtol=1e-6)
    sel = kl_cov_mask(logp, adv, mask, frac=0.4)  # ceil(0.4 * 5) = 2 of the 5 valid tokens
    np.testing.assert_array_equal(sel, [[0, 0, 1, 0], [0, 1, 0, 0]])
    sel = kl_cov_mask(logp, adv, mask, frac=1e-6)  # at least one
    np.testing.assert_array_equal(sel, [[0, 0, 0, 0], [0, 1, 0, 0]])
    sel = kl_cov_mask(logp, adv, mask, frac=1.0)  # everything valid, nothing masked
    np.testing.assert_array_equal(sel, mask)


@pytest.mark.parametrize("frac", [2e-4, 0.05, 0.3])
def test_kl_cov_matches_numpy(frac):
    logp, adv, mask = _batch(B=6, T=32, seed=1)
    rng = np.random.default_rng(2)
    old = (logp + rng.normal(0, 0.3, size=logp.shape)).astype(np.float32)
    cov = np.where(mask > 0, _numpy_cov(logp, adv, mask), -np.inf).reshape(-1)
    n_sel = max(1, math.ceil(frac * mask.sum() - 1e-9))
    expected = np.zeros(cov.size)
    expected[np.argsort(-cov)[:n_sel]] = 1.0
    expected = expected.reshape(mask.shape)

    sel = jax.jit(lambda *a: kl_cov_mask(*a, frac=frac))(logp, adv, mask)
    np.testing.assert_array_equal(sel, expected)
    assert float(np.asarray(sel)[mask == 0].sum()) == 0.0

    pen, grad = jax.value_and_grad(lambda lp: jnp.sum(kl_cov(lp, old, adv, mask, frac=frac, coef=2.0)))(logp)
    np.testing.assert_allclose(pen, (2.0 * np.abs(logp - old) * expected).sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, 2.0 * np.sign(logp - old) * expected, rtol=1e-6)


def test_kl_cov_count_is_fraction_of_valid_tokens():
    mask = np.zeros((4, 5000), np.float32)
    mask[:, :2500] = 1.0  # 10000 valid of 20000 tokens: 2e-4 -> exactly 2 tokens
    rng = np.random.default_rng(3)
    logp, adv = rng.normal(size=(2, 4, 5000)).astype(np.float32)
    sel = np.asarray(kl_cov_mask(logp, adv, mask))
    assert sel.sum() == 2 and sel[mask == 0].sum() == 0


def _clip_cov_case():
    """10 valid tokens with Cov = adv * logp (both centred at 0 over valid tokens)."""
    logp = np.array([[1.5, -1.5, 2.0, 1.0, 2.0, 9.0], [-2.0, 2.0, -1.0, -1.0, -0.5, -0.5]], np.float32)
    adv = np.array([[1.0, -1.0, 1.0, 1.0, 1.0, 9.0], [-1.0, -1.0, 1.0, -1.0, 1.0, -1.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    return logp, adv, mask


def test_clip_cov_hand_built():
    logp, adv, mask = _clip_cov_case()
    cov = np.asarray(token_cov(logp, adv, mask))
    np.testing.assert_array_equal(cov[0, :4], [1.5, 1.5, 2.0, 1.0])
    np.testing.assert_array_equal(cov[1], [2.0, -2.0, -1.0, 1.0, -0.5, 0.5])
    assert 1 < cov[0, 4] < 5  # a masked token inside the band: never eligible
    eligible = np.zeros_like(mask, bool)
    eligible[0, :3] = eligible[1, 0] = True  # Cov = 1.0 exactly is outside the open interval

    # fraction large enough: every eligible token is dropped, nothing else
    keep = clip_cov(logp, adv, mask, jax.random.key(0), frac=1.0)
    np.testing.assert_array_equal(keep, 1.0 - eligible)
    # ceil(0.2 * 10 valid) = 2 random eligible tokens dropped
    seen, clip_fn = set(), jax.jit(lambda k: clip_cov(logp, adv, mask, k, frac=0.2))
    for seed in range(30):
        keep = np.asarray(clip_fn(jax.random.key(seed)))
        dropped = keep == 0
        assert dropped.sum() == 2 and np.all(eligible[dropped])
        seen |= set(zip(*np.nonzero(dropped)))
    assert seen == set(zip(*np.nonzero(eligible)))  # random: all eligible tokens get picked some time
    # a narrower band and an exclusion mask
    keep = clip_cov(logp, adv, mask, jax.random.key(1), frac=1.0, clip_lo=1.8, clip_hi=2.5)
    np.testing.assert_array_equal(np.argwhere(np.asarray(keep) == 0), [[0, 2], [1, 0]])
    exclude = np.zeros_like(mask, bool)
    exclude[0, 2] = True
    keep = clip_cov(logp, adv, mask, jax.random.key(1), frac=1.0, clip_lo=1.8, clip_hi=2.5, exclude=exclude)
    np.testing.assert_array_equal(np.argwhere(np.asarray(keep) == 0), [[1, 0]])


def test_clip_cov_no_eligible_and_empty_mask():
    logp, adv, mask = _batch(seed=4)
    keep = clip_cov(logp, adv, mask, jax.random.key(0), clip_lo=1e6, clip_hi=2e6)
    np.testing.assert_array_equal(keep, 1.0)
    keep = clip_cov(logp, adv, np.zeros_like(mask), jax.random.key(0), frac=1.0)
    np.testing.assert_array_equal(keep, 1.0)
    np.testing.assert_array_equal(kl_cov_mask(logp, adv, np.zeros_like(mask)), 0.0)


def test_clip_cov_random_batch_never_picks_masked():
    logp, adv, mask = _batch(B=8, T=64, seed=5)
    cov = _numpy_cov(logp, adv, mask)
    eligible = (mask > 0) & (cov > 1) & (cov < 5)
    n_sel = max(1, math.ceil(0.02 * mask.sum() - 1e-9))
    assert eligible.sum() > n_sel
    keep = np.asarray(clip_cov(logp, adv, mask, jax.random.key(7), frac=0.02))
    assert (keep == 0).sum() == n_sel and np.all(eligible[keep == 0])
    # the mask zeroes exactly those tokens' loss gradient
    g = jax.grad(lambda lp: jnp.sum(lp * keep))(logp)
    np.testing.assert_array_equal(g, keep)


def test_abs_zero_grad_matches_numpy_and_is_flat_at_zero():
    from uecjax.objectives.policy_loss import abs_zero_grad

    d = np.random.default_rng(8).normal(size=(4, 16)).astype(np.float32)
    d[0, :5] = 0.0
    d[1, 0] = -0.0
    value, grad = jax.value_and_grad(lambda v: jnp.sum(abs_zero_grad(v)))(d)
    np.testing.assert_array_equal(abs_zero_grad(d), np.abs(d))
    np.testing.assert_array_equal(grad, np.sign(d))  # 0 where d == 0, unlike jax.grad(jnp.abs)
    assert float(jax.grad(jnp.abs)(0.0)) == 1.0  # the behaviour being avoided


def test_kl_cov_has_zero_gradient_at_ratio_one():
    """Fresh rows: log pi == log pi_old, so k |log pi - log pi_old| gives neither value nor gradient."""
    logp, adv, mask = _batch(B=6, T=32, seed=9)
    pen, grad = jax.value_and_grad(lambda lp: jnp.sum(kl_cov(lp, logp, adv, mask, frac=0.3, coef=2.0)))(logp)
    assert float(pen) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    assert float(np.asarray(kl_cov_mask(logp, adv, mask, frac=0.3)).sum()) > 10  # tokens were selected
