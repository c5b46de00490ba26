"""Method presets and registry, LossConfig / OptimConfig validation, schedules, decay mask."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from train_helpers import tiny_model
from uecjax.objectives.loss_config import LossConfig, LossConfigError
from uecjax.objectives.methods import METHODS, get_method, loss_config
from uecjax.optim import OptimConfig, OptimConfigError, decay_mask, make_optimizer, make_schedule


def test_registry_has_every_method_of_the_spec():
    assert set(METHODS) == {"grpo", "dapo", "entropy_reg", "clip_cov", "kl_cov", "entropy_adv", "aer", "uec",
                            "uec_code", "gspo"}
    assert get_method("clip_cov").select is not None and get_method("grpo").select is None
    with pytest.raises(LossConfigError, match="unknown method 'ppo'.*known methods"):
        loss_config("ppo")


def test_presets_then_overrides():
    assert loss_config("grpo") == LossConfig()
    dapo = loss_config("dapo")
    assert (dapo.eps_high, dapo.beta, dapo.agg, dapo.dynamic_sampling) == (0.28, 0.0, "token-mean", True)
    assert dapo.overlong_buffer > 0
    uec = loss_config("uec")
    assert uec.explore and uec.stabilizer and uec.gate == "linear" and uec.alpha == 0.01
    assert not loss_config("grpo").explore and not loss_config("aer").stabilizer
    ablation = loss_config("uec", stabilizer=False, gate="hard", gate_tau=0.0)
    assert ablation.explore and not ablation.stabilizer and ablation.gate == "hard"
    assert loss_config("dapo", eps_high=0.3).eps_high == 0.3
    gspo = loss_config("gspo")  # GSPO's paper / verl's recipe
    assert (gspo.ratio_level, gspo.eps_low, gspo.eps_high, gspo.agg, gspo.beta) == (
        "sequence", 3e-4, 4e-4, "seq-mean-token-mean", 0.0)
    assert LossConfig().ratio_level == "token" and LossConfig().explore_is_cap == 0.0
    with pytest.raises(LossConfigError, match=r"unknown LossConfig field\(s\) \['alpah'\]"):
        loss_config("uec", alpah=0.1)
    assert LossConfig().stabilizer_anchor == "current"


@pytest.mark.parametrize("field,value,message", [
    ("eps_low", 1.0, "eps_low=1.0: must be in"),
    ("dual_clip", 1.0, "dual_clip=1.0: must be > 1"),
    ("agg", "mean", "agg='mean': expected one of"),
    ("kl_kind", "k4", "expected one of"),
    ("gate", "step", "gate='step'"),
    ("gate_tau", 0.0, "linear gate"),
    ("beta", -0.1, "beta=-0.1: must be >= 0"),
    ("kappa", 0.0, "kappa=0.0: must be > 0"),
    ("stabilizer_anchor", "new", "expected one of"),
    ("cov_frac", 0.0, "cov_frac"),
    ("aer_alpha0", 0.5, "aer_alpha_max"),
    ("overlong_buffer", 2.0, "fraction"),
    ("advantage", "ppo", "expected one of"),
    ("ratio_level", "seq", "ratio_level='seq': expected one of"),
    ("explore_is_cap", -1.0, "explore_is_cap=-1.0: must be >= 0"),
])
def test_loss_config_rejects_bad_values(field, value, message):
    with pytest.raises(LossConfigError, match=message):
        LossConfig(**{field: value})


@pytest.mark.parametrize("field,value,message", [
    ("schedule", "step", "expected one of"), ("learning_rate", 0.0, "must be > 0"),
    ("b2", 1.0, r"in \[0, 1\)"), ("total_steps", 10, "must exceed warmup_steps"),
])
def test_optim_config_rejects_bad_values(field, value, message):
    base = dict(schedule="warmup_cosine", warmup_steps=10, total_steps=100)
    with pytest.raises(OptimConfigError, match=message):
        OptimConfig(**{**base, field: value})


def test_schedules():
    lr = 1e-3
    const = make_schedule(OptimConfig(learning_rate=lr, warmup_steps=10))
    np.testing.assert_allclose([const(0), const(5), const(10), const(500)], [0, lr / 2, lr, lr], rtol=1e-6)
    cos = make_schedule(OptimConfig(learning_rate=lr, schedule="warmup_cosine", warmup_steps=10,
                                    total_steps=110, end_lr_ratio=0.1))
    np.testing.assert_allclose([cos(10), cos(60), cos(110)],
                               [lr, 0.1 * lr + 0.9 * lr * 0.5, 0.1 * lr], rtol=1e-5)
    lin = make_schedule(OptimConfig(learning_rate=lr, schedule="linear", warmup_steps=0, total_steps=100))
    np.testing.assert_allclose([lin(0), lin(50), lin(100)], [lr, lr / 2, 0.0], rtol=1e-6, atol=1e-12)


def test_weight_decay_skips_norms_and_biases():
    params = nnx.state(tiny_model())
    mask = decay_mask(params)
    assert mask["layers"]["q_w"].get_value() and mask["embed"].get_value()
    assert not mask["layers"]["q_b"].get_value() and not mask["final_norm"].get_value()
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1e-3, b1=0.0, b2=0.0, eps=1e-12)
    opt = make_optimizer(cfg)
    grads = optax.tree_utils.tree_zeros_like(params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    # zero gradients: the update is the decay alone, -lr * wd * param, on decayed params only
    np.testing.assert_allclose(updates["layers"]["q_w"].get_value(), -0.05 * params["layers"]["q_w"].get_value(),
                               rtol=1e-6)
    np.testing.assert_array_equal(updates["final_norm"].get_value(), 0.0)


def _inputs(seed=0, b=4, r=6, select=None):
    import jax.numpy as jnp

    from uecjax.objectives.methods import LossInputs
    rng = np.random.default_rng(seed)
    mask = (rng.uniform(size=(b, r)) < 0.8).astype(np.float32)
    mask[0] = 0  # an empty row
    adv = np.repeat(rng.normal(size=(b, 1)), r, 1).astype(np.float32) * mask
    return LossInputs(
        logp=jnp.asarray(rng.normal(-2, 1, (b, r)), jnp.float32),
        entropy=jnp.asarray(rng.uniform(0.5, 2, (b, r)), jnp.float32),
        old_logp=jnp.asarray(rng.normal(-2, 1, (b, r)), jnp.float32), ref_logp=None,
        adv=jnp.asarray(adv), mask=jnp.asarray(mask),
        success_rate=jnp.asarray([0.0, 0.2, 0.6, 1.0], jnp.float32), hard=jnp.asarray([1, 0, 0, 0.0]),
        select=None if select is None else jnp.asarray(select), num_tokens=jnp.float32(mask.sum() + 3),
        num_seqs=jnp.float32(5), max_len=r, h0=jnp.float32(1.0), h_anchor=jnp.float32(1.4),
        aer_alpha=jnp.float32(0.07))


def test_method_terms_against_formulas():
    """Each method's loss and its gradient in (log pi, H), against the per-token formulas."""
    import jax.numpy as jnp

    from uecjax.objectives import ppo_clip_loss
    from uecjax.objectives.methods import loss_terms

    def grads(loss_cfg, x):
        def total(logp, ent):
            parts, _ = loss_terms(x._replace(logp=logp, entropy=ent), loss_cfg)
            return sum(parts.values())
        return jax.grad(total, argnums=(0, 1))(x.logp, x.entropy)

    x = _inputs()
    m, n = np.asarray(x.mask), float(x.num_tokens)
    g_pg, g_h = grads(loss_config("grpo", beta=0.0), x)
    np.testing.assert_array_equal(g_h, 0.0)
    select = (np.random.default_rng(1).uniform(size=m.shape) < 0.5).astype(np.float32)
    xs = x._replace(select=jnp.asarray(select))

    # clip_cov: gradient dropped on the selected-out tokens, value kept
    g, _ = grads(loss_config("clip_cov", beta=0.0), xs)
    np.testing.assert_allclose(g, np.asarray(g_pg) * select, rtol=1e-6, atol=1e-8)
    v = loss_terms(xs, loss_config("clip_cov", beta=0.0))[0]["pg"]
    np.testing.assert_allclose(v, loss_terms(x, loss_config("grpo", beta=0.0))[0]["pg"], rtol=1e-6)
    # kl_cov: + k |log pi - log pi_old| on the selected tokens
    g, _ = grads(loss_config("kl_cov", beta=0.0, kl_cov_coef=2.0), xs)
    kl_grad = 2.0 * np.sign(np.asarray(x.logp - x.old_logp)) * select * m / n
    np.testing.assert_allclose(g, np.asarray(g_pg) + kl_grad, rtol=1e-5, atol=1e-7)
    # entropy_adv: the policy loss with A + min(a H, |A| / k), no gradient through H
    loss_cfg = loss_config("entropy_adv", beta=0.0)
    shaped = (np.asarray(x.adv) + np.minimum(loss_cfg.entropy_adv_a * np.asarray(x.entropy), np.abs(x.adv) / 2)) * m
    ref = (np.asarray(ppo_clip_loss(x.logp, x.old_logp, shaped)[0]) * m).sum() / n
    np.testing.assert_allclose(loss_terms(x, loss_cfg)[0]["pg"], ref, rtol=1e-5)
    np.testing.assert_array_equal(grads(loss_cfg, x)[1], 0.0)
    # entropy_reg / aer / uec: the entropy gradient is -coef * weight_q * m / N
    p = np.asarray(x.success_rate)
    for loss_cfg, w in [(loss_config("entropy_reg", beta=0.0, entropy_coef=0.3), 0.3 * np.ones(4)),
                  (loss_config("aer", beta=0.0), 0.07 * (p <= 0.4)),
                  (loss_config("uec", beta=0.0, stabilizer=False, alpha=0.2), 0.2 * np.clip(1 - p / 0.5, 0, 1))]:
        np.testing.assert_allclose(grads(loss_cfg, x)[1], -w[:, None] * m / n, rtol=1e-6, atol=1e-8, err_msg=loss_cfg.method)
    # the stabilizer's surrogate: 2 lambda relu(anchor - kappa H_0) on d(sum m H / N)
    loss_cfg = loss_config("uec", beta=0.0, explore=False, lam=1.5)
    np.testing.assert_allclose(grads(loss_cfg, x)[1], 2 * 1.5 * 0.4 * m / n, rtol=1e-5)
    np.testing.assert_array_equal(grads(loss_cfg, x._replace(h_anchor=jnp.float32(0.9)))[1], 0.0)


def test_kl_cov_at_ratio_one_is_grpo():
    """Fresh rows (log pi == log pi_old): KL-Cov's penalty adds no gradient, whatever it selects."""
    import jax.numpy as jnp

    from uecjax.objectives.methods import loss_terms

    x = _inputs(seed=2)
    x = x._replace(old_logp=x.logp, select=jnp.asarray((np.asarray(x.mask) > 0).astype(np.float32)))

    def grad(loss_cfg):
        return jax.grad(lambda lp: sum(loss_terms(x._replace(logp=lp), loss_cfg)[0].values()))(x.logp)
    g_grpo = grad(loss_config("grpo", beta=0.0))
    np.testing.assert_array_equal(grad(loss_config("kl_cov", beta=0.0, kl_cov_coef=5.0)), g_grpo)
    assert np.abs(np.asarray(g_grpo)).max() > 0


# GSPO through the train step: micro-batches sum to one big batch, sequence stats per sequence
GSPO_MICRO = {
    "gspo": dict(method="gspo", eps_low=0.003, eps_high=0.004),
    # GSPO-token with KL, exploration and the stabilizer at the old-pass anchor
    "gspo_token_uec": dict(method="uec", ratio_level="sequence_token", eps_low=0.003, eps_high=0.004,
                           beta=0.05, alpha=0.05, lam=2.0, stabilizer_anchor="old"),
}


@pytest.mark.parametrize("case", sorted(GSPO_MICRO))
def test_gspo_micro_batches_equal_one_big_batch(case):
    import jax.numpy as jnp

    from train_helpers import SGD_LIKE, host, naive_logp_entropy, perturbed, random_batch, single_mesh, with_logprobs
    from uecjax.train_step import TrainStep

    model = tiny_model()
    loss_cfg = loss_config(**GSPO_MICRO[case])
    scorer = TrainStep(model, loss_config("grpo", beta=0.0), SGD_LIKE, single_mesh())
    base = nnx.state(model)
    batch = with_logprobs(scorer, base, random_batch(seed=5), ref_params=perturbed(base, 0.05, 7), noise=0.01)
    m = batch.response_mask
    h0 = 0.7 * float(np.sum(m * batch.old_entropy) / m.sum())
    results = []
    for micro in (1, 4):
        ts = TrainStep(model, loss_cfg, SGD_LIKE, single_mesh(), micro_batches=micro, chunk_size=8)
        params, opt_state, control = ts.init(base, h0=h0)
        results.append(host(ts.gradients(params, control, batch)))
    (g1, m1, _), (g4, m4, _) = results
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sorted(m4) == sorted(m1)
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)

    # seq_clip_frac: the fraction of non-empty sequences whose ratio s_i left the clip range
    logp, _ = naive_logp_entropy(base, batch, scorer.graphdef)
    n_i = np.maximum(m.sum(-1), 1)
    s = np.exp(np.sum(m * (np.asarray(logp) - batch.old_logp), -1) / n_i)
    a = np.asarray(batch.advantages)
    valid = m.sum(-1) > 0
    low, high = valid & (a < 0) & (s < 1 - loss_cfg.eps_low), valid & (a > 0) & (s > 1 + loss_cfg.eps_high)
    assert (low | high).any() and not (low | high)[valid].all()
    np.testing.assert_allclose(m1["seq_clip_frac"], (low | high).sum() / valid.sum(), rtol=1e-6)
    np.testing.assert_allclose(m1["seq_clip_frac_low"], low.sum() / valid.sum(), rtol=1e-6)
    if loss_cfg.stabilizer:
        assert m1["stabilizer_penalty"] > 1e-3 and m1["loss/kl"] > 0
    assert float(jnp.abs(jnp.asarray(jax.tree.leaves(g1)[0])).max()) > 0
