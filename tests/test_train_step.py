"""The train step against references (ALGORITHMS.md sections 2-7, 9): the plain policy
gradient, one big batch, the gate / stabilizer / AER formulas through full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train_helpers import (P, SGD_LIKE, host, naive_logp_entropy, perturbed, random_batch, single_mesh,
                           tiny_model, with_logprobs)
from uecjax.control import init_control_state, update_control
from uecjax.objectives.methods import loss_config
from uecjax.parallel.mesh import ShardingError
from uecjax.train_step import TrainStep


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host(a)), jax.tree.leaves(host(b))):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def assert_metrics_close(a, b, rtol=1e-5, atol=1e-6):
    a, b = host(a), host(b)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def token_mean(x, batch):
    m = jnp.asarray(batch.response_mask)
    return jnp.sum(m * x) / m.sum()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def grpo(model):
    """GRPO, beta = 0, one device, no micro-batches; also scores batches for the other tests."""
    return TrainStep(model, loss_config("grpo", beta=0.0), SGD_LIKE, single_mesh())


def test_grpo_gradient_is_the_policy_gradient(model, grpo):
    """pi = pi_old, beta = 0: the clipped loss's gradient is -grad sum(A m log pi) / N."""
    params, _, control = grpo.init(nnx.state(model))
    batch = with_logprobs(grpo, params, random_batch())
    grads, metrics, _ = grpo.gradients(params, control, batch)

    def objective(p):
        logp, _ = naive_logp_entropy(p, batch, grpo.graphdef)
        return token_mean(jnp.asarray(batch.advantages)[:, None] * logp, batch)

    assert_trees_close(grads, jax.tree.map(jnp.negative, jax.jit(jax.grad(objective))(params)))
    # its value is the surrogate -sum(rho A m) / N at rho = 1
    np.testing.assert_allclose(metrics["loss/pg"], -token_mean(batch.advantages[:, None], batch), rtol=1e-5, atol=1e-7)
    assert float(optax_norm(grads)) > 1e-3  # a real gradient, not zeros on both sides
    for k in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl_old"):
        assert abs(float(metrics[k])) < 1e-6


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_step_metrics_and_h0(model, grpo):
    params, opt_state, control = grpo.init(nnx.state(model))
    b1 = with_logprobs(grpo, params, random_batch(seed=3, success_rate=np.repeat([0.0, 0.5, 0.0, 1.0], 2)))
    grads, _, _ = grpo.gradients(params, control, b1)
    logp, entropy = naive_logp_entropy(params, b1, grpo.graphdef)
    params, opt_state, control, m = grpo.step(params, opt_state, control, b1)
    m = host(m)
    mask = b1.response_mask
    np.testing.assert_allclose(m["entropy"], token_mean(entropy, b1), rtol=1e-5)
    hard_rows = b1.is_hard[:, None] * mask
    np.testing.assert_allclose(m["entropy_hard"], np.sum(hard_rows * entropy) / hard_rows.sum(), rtol=1e-5)
    easy_rows = mask - hard_rows
    np.testing.assert_allclose(m["entropy_easy"], np.sum(easy_rows * entropy) / easy_rows.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["h0"], token_mean(b1.old_entropy, b1), rtol=1e-6)  # set by the first batch
    np.testing.assert_allclose(float(control.h0), m["h0"])
    assert m["tokens"] == mask.sum() and m["seqs"] == (mask.sum(1) > 0).sum()
    np.testing.assert_allclose(m["logp_gap"], 0.01, rtol=1e-4)  # sampler_logp = old + 0.01
    np.testing.assert_allclose(m["grad_norm"], optax_norm(grads), rtol=1e-5)
    np.testing.assert_allclose(m["lr"], SGD_LIKE.learning_rate)
    assert int(control.step) == 1

    # H_0 is kept from the first batch; a second, different batch does not move it.
    b2 = with_logprobs(grpo, params, random_batch(seed=4))
    _, _, control, m2 = grpo.step(params, opt_state, control, b2)
    assert float(m2["h0"]) == float(m["h0"]) and int(control.step) == 2
    assert abs(float(token_mean(b2.old_entropy, b2)) - float(m["h0"])) > 1e-3


MICRO_CASES = {
    # beta > 0 with a reference; old params perturbed so ratios leave the clip range.
    "grpo": dict(method="grpo", beta=0.05),
    # explore + stabilizer active (H_0 set below the entropy), old-pass anchor
    "uec": dict(method="uec", beta=0.05, alpha=0.05, lam=2.0, stabilizer_anchor="old"),
    # current-parameter anchor: exact even though pi_old's entropy differs
    "uec_current": dict(method="uec", beta=0.0, alpha=0.05, lam=2.0, stabilizer_anchor="current"),
    "kl_cov": dict(method="kl_cov", beta=0.0, cov_frac=0.2, agg="seq-mean-token-mean"),
    "clip_cov": dict(method="clip_cov", beta=0.0, cov_frac=0.3, clip_cov_lo=0.05, clip_cov_hi=50.0),
}


@pytest.mark.parametrize("case", sorted(MICRO_CASES))
def test_micro_batches_equal_one_big_batch(model, grpo, case):
    loss_cfg = loss_config(**MICRO_CASES[case])
    base, _, _ = grpo.init(nnx.state(model))
    batch = with_logprobs(grpo, base, random_batch(seed=5), ref_params=perturbed(base, 0.05, 7), noise=0.05)
    h0 = 0.7 * float(token_mean(batch.old_entropy, batch))
    results = []
    for micro in (1, 4):
        ts = TrainStep(model, loss_cfg, SGD_LIKE, single_mesh(), micro_batches=micro, chunk_size=8)
        params, opt_state, control = ts.init(nnx.state(model), h0=h0)
        results.append(host(ts.step(params, opt_state, control, batch)))
    (p1, _, _, m1), (p4, _, _, m4) = results
    assert_trees_close(p4, p1)
    assert_metrics_close(m4, m1)
    assert m1["clip_frac_low"] + m1["clip_frac_high"] > 0  # the clip is exercised
    if loss_cfg.stabilizer:
        assert m1["stabilizer_penalty"] > 1e-3 and m1["loss/explore"] < 0
    if loss_cfg.method.endswith("cov"):
        assert m1["cov_selected"] > 0.05


@pytest.mark.parametrize("method,over", [("uec", dict(gate="linear", gate_tau=0.5)),
                                         ("uec", dict(gate="hard", gate_tau=0.25)),
                                         ("aer", dict(aer_alloc="hard", aer_tau=0.4, aer_alpha0=0.1))])
def test_entropy_bonus_is_gated_off_on_easy_prompts(model, grpo, method, over):
    """Zero advantages: the gradient is the gated entropy bonus alone; easy rows add nothing."""
    loss_cfg = loss_config(method, beta=0.0, stabilizer=False, alpha=0.1, **over)
    ts = TrainStep(model, loss_cfg, SGD_LIKE, single_mesh())
    params, _, control = ts.init(nnx.state(model))
    p = np.repeat(np.array([0.0, 0.25, 0.75, 1.0], np.float32), 2)
    batch = with_logprobs(grpo, params, random_batch(success_rate=p).replace(advantages=np.zeros(8, np.float32)))
    if method == "uec":
        tau = loss_cfg.gate_tau
        w = np.clip(1 - p / tau, 0, 1) if loss_cfg.gate == "linear" else (p <= tau).astype(np.float32)
        coef = loss_cfg.alpha
    else:
        w, coef = (p <= loss_cfg.aer_tau).astype(np.float32), loss_cfg.aer_alpha0
    assert w[4:].max() == 0 and w[:2].min() == 1  # rows 4..7 are easy

    grads, metrics, _ = ts.gradients(params, control, batch)
    ref = jax.grad(lambda q: -coef * token_mean(w[:, None] * naive_logp_entropy(q, batch, ts.graphdef)[1], batch))
    assert_trees_close(grads, jax.jit(ref)(params))

    def resample(rows):  # other response tokens on `rows`, same masks
        tokens = batch.tokens.copy()
        new = np.random.default_rng(9).integers(1, 64, tokens[:, P:].shape)
        tokens[rows, P:] = np.where(batch.attention_mask[rows, P:] > 0, new[rows], 0)
        return with_logprobs(grpo, params, batch.replace(tokens=tokens))

    assert_trees_close(ts.gradients(params, control, resample(slice(4, 8)))[0], grads)
    changed = host(ts.gradients(params, control, resample(slice(0, 4)))[0])
    assert not np.allclose(jax.tree.leaves(changed)[0], jax.tree.leaves(host(grads))[0], atol=1e-6)


def test_stabilizer_gradient(model, grpo):
    """Zero below H_max; above, the exact gradient of lambda (Hbar - H_max)^2, and descent
    along it lowers the entropy."""
    loss_cfg = loss_config("uec", beta=0.0, explore=False, lam=2.0, kappa=1.0)
    ts = TrainStep(model, loss_cfg, SGD_LIKE, single_mesh())
    params, _, _ = ts.init(nnx.state(model))
    batch = with_logprobs(grpo, params, random_batch(seed=2).replace(advantages=np.zeros(8, np.float32)))

    def hbar(q):
        return token_mean(naive_logp_entropy(q, batch, ts.graphdef)[1], batch)

    h = float(hbar(params))
    below = jax.device_put(init_control_state(loss_cfg, h0=1.1 * h), ts.replicated)
    grads, metrics, _ = ts.gradients(params, below, batch)
    assert all(np.all(g == 0) for g in jax.tree.leaves(host(grads)))
    assert float(metrics["stabilizer_penalty"]) == 0.0

    h0 = 0.8 * h
    above = jax.device_put(init_control_state(loss_cfg, h0=h0), ts.replicated)
    grads, metrics, _ = ts.gradients(params, above, batch)
    assert_trees_close(grads, jax.jit(jax.grad(lambda q: loss_cfg.lam * (hbar(q) - h0) ** 2))(params))
    np.testing.assert_allclose(metrics["stabilizer_penalty"], loss_cfg.lam * (h - h0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/stab"], metrics["stabilizer_penalty"])
    np.testing.assert_allclose(metrics["h_max"], h0, rtol=1e-6)
    stepped = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert float(hbar(stepped)) < h - 1e-3


def test_aer_coefficient_moves_toward_its_target():
    loss_cfg = loss_config("aer", aer_eta=0.1, aer_alpha_max=0.5, aer_alpha0=0.2, aer_rho=0.6)
    control = init_control_state(loss_cfg, h0=2.0)  # H* = 1.2
    assert float(update_control(control, {"entropy": 1.5}, loss_cfg).aer_alpha) == pytest.approx(0.17)
    assert float(update_control(control, {"entropy": 0.7}, loss_cfg).aer_alpha) == pytest.approx(0.25)
    low, high = control, control
    for _ in range(20):
        low = update_control(low, {"entropy": 0.0}, loss_cfg)  # far below target: up to alpha_max
        high = update_control(high, {"entropy": 3.0}, loss_cfg)  # far above: down to 0
    assert float(low.aer_alpha) == pytest.approx(0.5) and float(high.aer_alpha) == 0.0
    grpo_hp = loss_config("grpo")
    assert update_control(control, {"entropy": 0.0}, grpo_hp) is control


def test_clear_errors(model, grpo):
    params, opt_state, control = grpo.init(nnx.state(model))
    batch = random_batch()
    with pytest.raises(ValueError, match="old_logp"):
        grpo.gradients(params, control, batch)
    with pytest.raises(ShardingError, match="multiple of micro_batches"):
        TrainStep(model, loss_config("grpo"), SGD_LIKE, single_mesh(), micro_batches=3).compute_logprobs(params, batch)
    ts = TrainStep(model, loss_config("grpo", beta=0.1), SGD_LIKE, single_mesh())
    with pytest.raises(ValueError, match="ref_logp"):
        ts.gradients(params, control, with_logprobs(grpo, params, batch))
