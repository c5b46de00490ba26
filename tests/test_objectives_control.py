"""Difficulty, UEC gates / exploration / stabilizer, and AER vs numpy (sections 5, 6, 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.objectives import (
    aer_allocation,
    aer_target,
    aer_update,
    aggregate,
    exploration_loss,
    gate_weight,
    is_hard,
    per_sequence,
    stabilizer_penalty,
    success_rate,
)

P_VALUES = np.array([0.0, 0.125, 0.25, 0.4, 0.5, 0.75, 1.0], np.float32)


def test_success_rate_and_per_sequence():
    acc = np.array([[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]])
    p = success_rate(acc)
    assert isinstance(p, np.ndarray) and p.dtype == np.float32
    np.testing.assert_array_equal(p, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(per_sequence(p, 2), [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_array_equal(is_hard(p), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(is_hard(p, 0.5), [1.0, 1.0, 0.0])


@pytest.mark.parametrize("kind,tau,s", [("hard", 0.0, None), ("hard", 0.4, None), ("linear", 0.5, None),
                                        ("sigmoid", 0.5, 0.1), ("sigmoid", 0.3, 0.05)])
def test_gate_weight_matches_numpy(kind, tau, s):
    p = P_VALUES.astype(np.float64)
    ref = {"hard": lambda: (P_VALUES <= np.float32(tau)).astype(float),  # p = 0.4 is hard at tau = 0.4
           "linear": lambda: np.clip(1 - p / tau, 0, 1),
           "sigmoid": lambda: 1 / (1 + np.exp(-(tau - p) / s))}[kind]()
    kwargs = {} if s is None else {"s": s}
    w = jax.jit(lambda p: gate_weight(p, kind, tau, **kwargs))(P_VALUES)
    np.testing.assert_allclose(w, ref, rtol=1e-6, atol=1e-7)
    assert np.all((np.asarray(w) >= 0) & (np.asarray(w) <= 1))
    assert float(w[0]) > 0.5  # the hardest prompt is explored
    easy = P_VALUES > tau
    if kind == "sigmoid":
        assert np.all(np.asarray(w)[P_VALUES >= tau + 5 * s] < 1e-2)
    else:
        np.testing.assert_array_equal(np.asarray(w)[easy], 0.0)  # easy prompts: no exploration


def test_exploration_loss_matches_numpy_and_raises_entropy():
    rng = np.random.default_rng(0)
    B, T = 4, 6
    ent = rng.uniform(0, 3, size=(B, T)).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) < 0.7).astype(np.float32)
    mask[3] = 0
    p_seq = np.array([0.0, 0.25, 1.0, 0.0], np.float32)
    w = gate_weight(p_seq)
    ref = -0.01 * (np.asarray(w)[:, None] * ent * mask).sum() / mask.sum()
    loss_fn = lambda e: exploration_loss(e, mask, w, 0.01)
    np.testing.assert_allclose(loss_fn(ent), ref, rtol=1e-5)
    g = np.asarray(jax.grad(loss_fn)(ent))
    np.testing.assert_allclose(g, -0.01 * np.asarray(w)[:, None] * mask / mask.sum(), rtol=1e-5)
    assert np.all(g[0][mask[0] > 0] < 0)  # descent raises entropy on the hard prompt
    np.testing.assert_array_equal(g[2], 0.0)  # and leaves the easy prompt alone
    # other aggregation modes and a traced alpha go through aggregate
    alpha = jnp.float32(0.05)
    np.testing.assert_allclose(
        jax.jit(lambda e, a: exploration_loss(e, mask, w, a, "seq-mean-token-mean"))(ent, alpha),
        -0.05 * aggregate(np.asarray(w)[:, None] * ent, mask, "seq-mean-token-mean"), rtol=1e-5)


@pytest.mark.parametrize("kappa,lam", [(1.0, 1.0), (1.2, 0.5)])
def test_stabilizer_penalty(kappa, lam):
    h0 = 2.0
    h_max = kappa * h0
    for hbar in [0.5, h_max - 0.01, h_max + 0.01, h_max + 1.5]:
        val, grad = jax.value_and_grad(lambda h: stabilizer_penalty(h, h0, kappa, lam))(jnp.float32(hbar))
        np.testing.assert_allclose(val, lam * max(hbar - h_max, 0) ** 2, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(grad, 2 * lam * max(hbar - h_max, 0), rtol=1e-4, atol=1e-8)
        if hbar <= h_max:
            assert float(grad) == 0.0
        else:
            assert float(grad) > 0.0  # gradient descent pushes the entropy down
    # H_0 is a constant: no gradient flows into it
    assert float(jax.grad(lambda h0: stabilizer_penalty(3.0, h0, kappa, lam))(jnp.float32(h0))) == 0.0


def test_stabilizer_through_token_entropy():
    ent = jnp.array([[3.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # Hbar = 9 / 4 = 2.25
    g = jax.grad(lambda e: stabilizer_penalty(aggregate(e, mask), h0=2.0))(ent)
    np.testing.assert_allclose(g, 2 * 0.25 * np.asarray(mask) / 4, rtol=1e-6)


def test_aer_allocation_and_target():
    np.testing.assert_array_equal(aer_allocation(P_VALUES), (P_VALUES <= 0.4).astype(np.float32))
    np.testing.assert_allclose(aer_allocation(P_VALUES, "linear"), np.clip(1 - P_VALUES / 0.4, 0, 1), rtol=1e-6)
    with pytest.raises(ValueError):
        aer_allocation(P_VALUES, "sigmoid")
    assert aer_target(2.5) == pytest.approx(1.5)
    assert aer_target(2.5, rho=0.8) == pytest.approx(2.0)


def test_aer_update_moves_toward_target_and_stays_in_range():
    h_star, alpha_max = 1.0, 0.1
    # entropy below target: alpha grows (more entropy bonus), saturating at alpha_max
    alpha, hist = 0.0, []
    for _ in range(50):
        alpha = aer_update(alpha, 0.2, h_star, eta=0.01, alpha_max=alpha_max)
        hist.append(alpha)
    assert hist[0] == pytest.approx(0.008)
    assert np.all(np.diff(hist) >= 0) and hist[-1] == pytest.approx(alpha_max)
    # entropy above target: alpha shrinks, floored at 0
    for _ in range(50):
        alpha = aer_update(alpha, 3.0, h_star, eta=0.01, alpha_max=alpha_max)
        assert 0.0 <= alpha <= alpha_max
    assert alpha == 0.0
    assert aer_update(0.05, 1.0, 1.0) == pytest.approx(0.05)  # at target: unchanged
    assert isinstance(aer_update(0.05, np.float32(0.5), 1.0), float)
