"""PPO dual-clip loss, KL estimators and aggregation vs numpy (section 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.objectives import aggregate, batch_counts, kl_penalty, ppo_clip_loss

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _random_batch(B=6, T=9, seed=0):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.5, size=(B, T)).astype(np.float32)
    old = (logp - rng.normal(0, 0.8, size=(B, T))).astype(np.float32)
    adv = np.repeat(rng.normal(size=(B, 1)), T, axis=1).astype(np.float32)
    adv[1] = 0.0
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    mask[2] = 0.0  # an empty row
    return logp, old, adv, mask


def _numpy_ppo(logp, old, adv, el=0.2, eh=0.2, c=3.0):
    rho = np.exp(logp.astype(np.float64) - old)
    out = np.empty_like(rho)
    for idx in np.ndindex(rho.shape):
        r, a = rho[idx], adv[idx]
        base = min(r * a, np.clip(r, 1 - el, 1 + eh) * a)
        out[idx] = -base if a >= 0 else -max(base, c * a)
    return out, rho


@pytest.mark.parametrize("el,eh", [(0.2, 0.2), (0.2, 0.28)])
def test_ppo_loss_values_indicators_and_grad(el, eh):
    logp, old, adv, _ = _random_batch(B=16, T=16)
    ref, rho = _numpy_ppo(logp, old, adv, el, eh)
    loss, ind = jax.jit(lambda *a: ppo_clip_loss(*a, eps_low=el, eps_high=eh))(logp, old, adv)
    np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)

    clip_low = (adv < 0) & (rho < 1 - el)
    clip_high = (adv > 0) & (rho > 1 + eh)
    dual = (adv < 0) & (rho > 3.0)
    assert clip_low.any() and clip_high.any() and dual.any()  # every regime is exercised
    np.testing.assert_array_equal(ind["clip_low"], clip_low)
    np.testing.assert_array_equal(ind["clip_high"], clip_high)
    np.testing.assert_array_equal(ind["dual_clip"], dual)

    # d l / d logp = -rho * A where no bound is active, 0 where one is
    grad = jax.grad(lambda lp: jnp.sum(ppo_clip_loss(lp, old, adv, eps_low=el, eps_high=eh)[0]))(logp)
    expected = np.where(clip_low | clip_high | dual, 0.0, -rho * adv)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_ppo_dual_clip_value():
    loss, ind = ppo_clip_loss(jnp.log(jnp.array([5.0, 2.0])), jnp.zeros(2), jnp.array([-1.0, -1.0]))
    np.testing.assert_allclose(loss, [3.0, 2.0], rtol=1e-6)  # min(rho, 3) * |A|
    np.testing.assert_array_equal(ind["dual_clip"], [1.0, 0.0])


def test_on_policy_grpo_gradient_is_plain_policy_gradient():
    logp, _, adv, mask = _random_batch(seed=3)
    n = mask.sum()

    def loss_fn(lp):
        loss, _ = ppo_clip_loss(lp, jax.lax.stop_gradient(lp), adv)  # rho = 1, pi = pi_old
        return aggregate(loss, mask, "token-mean")

    grad = jax.grad(loss_fn)(jnp.asarray(logp))
    np.testing.assert_allclose(grad, -adv * mask / n, rtol=1e-6, atol=1e-8)
    assert np.abs(grad).max() > 0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators(kind):
    rng = np.random.default_rng(4)
    logp = rng.normal(-2, 1, size=(4, 8)).astype(np.float32)
    ref = (logp - rng.normal(0, 1, size=(4, 8))).astype(np.float32)
    ref[0, :2] = logp[0, :2] - np.array([15.0, -15.0], np.float32)  # outside the clamp
    d = np.clip(logp.astype(np.float64) - ref, -10, 10)
    expected = {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) + d - 1}[kind]
    dexp = {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d)}[kind]
    dexp[0, :2] = 0.0  # clamped: no gradient
    np.testing.assert_allclose(kl_penalty(logp, ref, kind), expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(kl_penalty(lp, ref, kind)))(logp)
    np.testing.assert_allclose(grad, dexp, rtol=1e-4, atol=1e-6)
    if kind == "k3":
        assert np.all(np.asarray(kl_penalty(logp, ref, kind)) >= 0)
        np.testing.assert_allclose(kl_penalty(logp, logp, kind), 0.0, atol=1e-7)


def _numpy_agg(x, m, mode, n_tok=None, n_seq=None, max_len=None):
    x, m = x.astype(np.float64), m.astype(np.float64)
    if mode == "token-mean":
        return (x * m).sum() / (m.sum() if n_tok is None else n_tok)
    n_seq = (m.sum(-1) > 0).sum() if n_seq is None else n_seq
    total = 0.0
    for i in range(x.shape[0]):
        s = (x[i] * m[i]).sum()
        if mode == "seq-mean-token-mean":
            s = s / m[i].sum() if m[i].sum() > 0 else 0.0
        elif mode == "seq-mean-token-sum-norm":
            s = s / (x.shape[1] if max_len is None else max_len)
        total += s
    return total / n_seq


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_numpy_and_grad(mode):
    _, _, _, mask = _random_batch(seed=5)
    x = np.random.default_rng(6).normal(size=mask.shape).astype(np.float32)
    x[mask == 0] = np.nan  # whatever lies off the mask must not leak in
    out = jax.jit(lambda x, m: aggregate(x, m, mode))(x, mask)
    np.testing.assert_allclose(out, _numpy_agg(np.nan_to_num(x), mask, mode), rtol=1e-5)
    np.testing.assert_allclose(aggregate(x, mask, mode, max_len=32) if mode.endswith("norm") else out,
                               _numpy_agg(np.nan_to_num(x), mask, mode, max_len=32 if mode.endswith("norm") else None),
                               rtol=1e-5)
    # linear in x: the gradient is the weight of each token
    g = jax.grad(lambda x: aggregate(x, mask, mode))(np.nan_to_num(x))
    eps, fd = 1e-3, np.zeros_like(x)
    for idx in [(0, 0), (3, 1), (2, 0), (5, 8)]:
        xp = np.nan_to_num(x).astype(np.float64)
        xp[idx] += eps
        fd[idx] = (_numpy_agg(xp, mask, mode) - _numpy_agg(np.nan_to_num(x), mask, mode)) / eps
        np.testing.assert_allclose(g[idx], fd[idx], rtol=1e-3, atol=1e-6)
    assert np.all(np.asarray(g)[mask == 0] == 0)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_empty_is_zero_not_nan(mode):
    x = jnp.ones((3, 4))
    assert float(aggregate(x, jnp.zeros((3, 4)), mode)) == 0.0
    g = jax.grad(lambda x: aggregate(x, jnp.zeros((3, 4)), mode))(x)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation_equals_full_batch(mode):
    logp, old, adv, mask = _random_batch(B=8, seed=7)
    n_tok, n_seq = batch_counts(mask)
    assert float(n_tok) == mask.sum() and float(n_seq) == (mask.sum(-1) > 0).sum()

    def loss_fn(lp, o, a, m, **counts):
        return aggregate(ppo_clip_loss(lp, o, a)[0], m, mode, **counts)

    full_val, full_grad = jax.value_and_grad(loss_fn)(logp, old, adv, mask)
    val, grads = 0.0, []
    for sl in (slice(0, 3), slice(3, 8)):  # uneven micro-batches, with global normalisers
        v, g = jax.value_and_grad(loss_fn)(logp[sl], old[sl], adv[sl], mask[sl],
                                           global_token_count=n_tok, global_seq_count=n_seq)
        val, grads = val + v, grads + [g]
    np.testing.assert_allclose(val, full_val, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-5, atol=1e-8)
    # and local normalisers alone would not be exact (the test can fail)
    local = sum(loss_fn(logp[sl], old[sl], adv[sl], mask[sl]) for sl in (slice(0, 3), slice(3, 8)))
    assert abs(float(local) - float(full_val)) > 1e-4
