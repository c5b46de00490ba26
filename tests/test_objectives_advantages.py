"""Advantages, entropy-shaped advantage and DAPO overlong shaping vs numpy (sections 2, 7)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.objectives import broadcast_to_tokens, entropy_advantage, group_advantages, overlong_penalty


def _numpy_adv(r, G, kind):
    g = r.reshape(-1, G).astype(np.float64)
    out = np.empty_like(g)
    for p in range(g.shape[0]):
        for i in range(G):
            if kind == "grpo":
                out[p, i] = (g[p, i] - g[p].mean()) / (np.std(g[p], ddof=1) + 1e-6)
            elif kind == "drgrpo":
                out[p, i] = g[p, i] - g[p].mean()
            else:
                out[p, i] = g[p, i] - np.delete(g[p], i).mean()
    return out.reshape(r.shape)


@pytest.mark.parametrize("kind", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("shape", [(20,), (5, 4)])
def test_group_advantages_match_numpy(kind, shape):
    rng = np.random.default_rng(0)
    r = rng.choice([0.0, 0.1, 0.9, 1.0], size=shape).astype(np.float32)
    r.reshape(-1, 4)[0] = 1.0  # one group with all-equal rewards: zero advantage, no NaN
    adv = jax.jit(group_advantages, static_argnums=(1, 2))(r, 4, kind)
    assert adv.shape == r.shape and adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, _numpy_adv(r, 4, kind), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(adv).reshape(-1, 4)[0], 0.0, atol=1e-6)


def test_group_advantages_known_values():
    adv = group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4, "grpo")
    np.testing.assert_allclose(adv, np.array([1.5, -0.5, -0.5, -0.5]), rtol=1e-5)  # std(ddof=1) = 0.5
    np.testing.assert_allclose(group_advantages(np.array([1.0, 0.0, 0.0, 0.0]), 4, "rloo"),
                               [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
    with pytest.raises(ValueError):
        group_advantages(np.zeros(4), 4, "ppo")


def test_broadcast_to_tokens():
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.int32)
    np.testing.assert_array_equal(broadcast_to_tokens(np.array([2.0, -1.0]), mask), [[2, 2, 0], [0, 0, 0]])


def test_entropy_advantage_values_and_stop_gradient():
    rng = np.random.default_rng(1)
    adv = rng.normal(size=(3, 7)).astype(np.float32)
    ent = rng.uniform(0, 3, size=(3, 7)).astype(np.float32)
    ref = adv + np.minimum(0.4 * ent, np.abs(adv) / 2.0)
    np.testing.assert_allclose(entropy_advantage(adv, ent), ref, rtol=1e-6)
    # both branches of the min occur in this example
    assert np.any(0.4 * ent < np.abs(adv) / 2) and np.any(0.4 * ent > np.abs(adv) / 2)
    g = jax.grad(lambda e: jnp.sum(entropy_advantage(jnp.asarray(adv), e)))(jnp.asarray(ent))
    np.testing.assert_array_equal(g, 0.0)
    np.testing.assert_allclose(entropy_advantage(adv, ent, a=1.0, k=4.0),
                               adv + np.minimum(ent, np.abs(adv) / 4.0), rtol=1e-6)


def test_overlong_penalty():
    max_len, cache = 100, 20
    lengths = np.array([0, 50, 80, 81, 90, 100, 120])
    ref = np.where(lengths <= 80, 0.0, np.where(lengths <= 100, (80 - lengths) / 20, -1.0))
    out = jax.jit(overlong_penalty, static_argnums=(1, 2))(lengths, max_len, cache)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out)[[2, 4, 5]], [0.0, -0.5, -1.0])
    np.testing.assert_allclose(overlong_penalty(lengths, max_len, cache, factor=0.5), 0.5 * ref, rtol=1e-6)
