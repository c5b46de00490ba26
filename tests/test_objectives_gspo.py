"""GSPO / GSPO-token sequence ratios (section 4a) and per-token policy-loss weights (section 8)
through `loss_terms`, against numpy references of the value and of the gradient in log pi."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.objectives import aggregate, ppo_clip_loss
from uecjax.objectives.methods import LossInputs, loss_config, loss_terms

B, T = 16, 10


def _inputs(seed=0, noise=0.3, token_adv=False):
    """Random rows with ratio != 1, right padding, an empty row, garbage off the mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, B)
    lengths[2] = 0
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    old = rng.normal(-2, 1, (B, T)).astype(np.float32)
    # a per-row offset spreads the sequence ratios across the clip range
    logp = (old + rng.normal(0, noise, (B, 1)) + rng.normal(0, noise, (B, T))).astype(np.float32)
    logp[mask == 0] = 50.0
    adv = rng.normal(size=(B, T) if token_adv else (B, 1)) * np.ones((1, T))
    adv = (adv * mask).astype(np.float32)
    adv[0] = 0.0  # a zero-advantage row
    return LossInputs(
        logp=jnp.asarray(logp), entropy=jnp.ones((B, T)), old_logp=jnp.asarray(old), ref_logp=None,
        adv=jnp.asarray(adv), mask=jnp.asarray(mask), success_rate=jnp.zeros(B), hard=jnp.zeros(B),
        select=None, num_tokens=jnp.float32(mask.sum() + 5), num_seqs=jnp.float32((lengths > 0).sum() + 2),
        max_len=T, h0=jnp.float32(1.0), h_anchor=jnp.float32(1.0), aer_alpha=jnp.float32(0.0))


def _agg_weights(mask, mode, n_tok, n_seq):
    """d agg / d x_{i,t} for each aggregation mode (section 4)."""
    m = mask.astype(np.float64)
    if mode == "token-mean":
        return m / n_tok
    if mode == "seq-mean-token-mean":
        return m / np.maximum(m.sum(-1, keepdims=True), 1) / n_seq
    return m / n_seq  # seq-mean-token-sum


def _numpy_gspo(x, el, eh, mode, token_grad, weight=None):
    """(value, d value / d logp, clipped-low, clipped-high per sequence), float64."""
    m = np.asarray(x.mask, np.float64)
    lp, old, a_tok = (np.asarray(v, np.float64) for v in (x.logp, x.old_logp, x.adv))
    n_i = np.maximum(m.sum(-1), 1)
    s = np.exp(((lp - old) * m).sum(-1) / n_i)  # [B]
    a_seq = (a_tok * m).sum(-1) / n_i
    a = a_tok if token_grad else np.repeat(a_seq[:, None], T, 1)
    s_t = np.repeat(s[:, None], T, 1)
    unclipped = s_t * a <= np.clip(s_t, 1 - el, 1 + eh) * a
    loss = np.maximum(-a * s_t, -a * np.clip(s_t, 1 - el, 1 + eh))  # per token
    dl_ds = np.where(unclipped, -a, 0.0)
    w = _agg_weights(m, mode, float(x.num_tokens), float(x.num_seqs))
    if weight is not None:
        w = w * weight
    value = (w * loss).sum()
    if token_grad:  # d s_{i,t} / d logp_t = s_i, own token only
        grad = w * dl_ds * s_t
    else:  # d s_i / d logp_t = s_i m_t / n_i for every token of the row
        grad = (w * dl_ds).sum(-1, keepdims=True) * s_t * m / n_i[:, None]
    valid = m.sum(-1) > 0
    return value, grad * m, valid & (a_seq < 0) & (s < 1 - el), valid & (a_seq > 0) & (s > 1 + eh)


def _value_and_grad(x, loss_cfg):
    def total(logp):
        parts, stats = loss_terms(x._replace(logp=logp), loss_cfg)
        return sum(parts.values()), stats
    (value, stats), grad = jax.value_and_grad(total, has_aux=True)(x.logp)
    return value, grad, stats


CASES = [("sequence", "seq-mean-token-mean", 3e-4, 4e-4, 1e-3), ("sequence", "token-mean", 0.2, 0.28, 0.3),
         ("sequence_token", "seq-mean-token-mean", 3e-4, 4e-4, 1e-3),
         ("sequence_token", "seq-mean-token-sum", 0.2, 0.28, 0.3)]


@pytest.mark.parametrize("level,mode,el,eh,noise", CASES)
def test_sequence_ratio_loss_matches_numpy(level, mode, el, eh, noise):
    token_grad = level == "sequence_token"
    x = _inputs(seed=1, noise=noise, token_adv=token_grad)
    loss_cfg = loss_config("gspo", ratio_level=level, agg=mode, eps_low=el, eps_high=eh)
    value, grad, stats = _value_and_grad(x, loss_cfg)
    ref_value, ref_grad, low, high = _numpy_gspo(x, el, eh, mode, token_grad)
    assert low.any() and high.any() and not (low | high).all()  # both regimes are exercised
    np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=1e-7)
    assert np.abs(ref_grad).max() > 0 and np.all(np.asarray(grad)[np.asarray(x.mask) == 0] == 0)
    # sequence stats are sums over non-empty rows (the train step divides by the global count)
    assert float(stats["seq_clip_frac_low"]) == low.sum() and float(stats["seq_clip_frac_high"]) == high.sum()
    assert float(stats["seq_clip_frac"]) == (low | high).sum()
    assert float(stats["clip_frac_dual"]) == 0.0  # no dual clip at the sequence level


def test_gspo_and_gspo_token_agree_for_sequence_advantages():
    """Broadcast advantages, seq-mean-token-mean: the two forms have the same value and gradient."""
    x = _inputs(seed=2, noise=1e-3)
    seq = _value_and_grad(x, loss_config("gspo"))
    tok = _value_and_grad(x, loss_config("gspo", ratio_level="sequence_token"))
    np.testing.assert_allclose(tok[0], seq[0], rtol=1e-6)
    np.testing.assert_allclose(tok[1], seq[1], rtol=1e-4, atol=1e-8)
    assert float(seq[2]["seq_clip_frac"]) > 0


def test_token_ratio_level_is_the_ppo_loss():
    """ratio_level="token" (default) is exactly the per-token dual-clip loss, aggregated."""
    x = _inputs(seed=3)
    for mode in ("token-mean", "seq-mean-token-mean"):
        loss_cfg = loss_config("grpo", beta=0.0, agg=mode)
        assert loss_cfg.ratio_level == "token"

        def ref(logp):
            return aggregate(ppo_clip_loss(logp, x.old_logp, x.adv)[0], x.mask, mode,
                             global_token_count=x.num_tokens, global_seq_count=x.num_seqs, max_len=T)
        value, grad, stats = _value_and_grad(x, loss_cfg)
        np.testing.assert_array_equal(value, ref(x.logp))
        np.testing.assert_array_equal(grad, jax.grad(ref)(x.logp))
        assert not any(k.startswith("seq_") for k in stats)


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_token_weight(level):
    x = _inputs(seed=4, noise=0.3)
    loss_cfg = loss_config("grpo", ratio_level=level, eps_low=0.2, eps_high=0.28, beta=0.0, agg="token-mean")
    base = _value_and_grad(x, loss_cfg)
    ones = _value_and_grad(x._replace(token_weight=jnp.ones((B, T))), loss_cfg)
    np.testing.assert_array_equal(ones[0], base[0])
    np.testing.assert_array_equal(ones[1], base[1])

    w = np.random.default_rng(5).uniform(0.0, 2.0, (B, T)).astype(np.float32)
    value, grad, _ = _value_and_grad(x._replace(token_weight=jnp.asarray(w)), loss_cfg)
    m, n = np.asarray(x.mask, np.float64), float(x.num_tokens)
    if level == "token":
        lp, old, a = (np.asarray(v, np.float64) for v in (x.logp, x.old_logp, x.adv))
        rho = np.exp(lp - old)
        loss = np.where(a < 0, np.minimum(np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.28)), -3 * a),
                        np.maximum(-a * rho, -a * np.clip(rho, 0.8, 1.28)))
        active = np.where(a < 0, (rho <= 0.8) | (rho >= 3), rho >= 1.28)  # a bound holds: no gradient
        ref_value = (w * m * loss).sum() / n
        ref_grad = np.where(active, 0.0, -a * rho) * w * m / n
    else:
        ref_value, ref_grad, _, _ = _numpy_gspo(x, 0.2, 0.28, "token-mean", level == "sequence_token", weight=w)
    np.testing.assert_allclose(value, ref_value, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=1e-7)
    if level != "sequence":  # per-token ratios: each token's gradient is scaled by its own weight
        nz = np.abs(np.asarray(base[1])) > 0
        np.testing.assert_allclose(np.asarray(grad)[nz], (w * np.asarray(base[1]))[nz], rtol=1e-5)


def test_token_weight_leaves_kl_and_entropy_terms_alone():
    x = _inputs(seed=6)
    x = x._replace(ref_logp=x.old_logp - 0.1, entropy=jnp.asarray(np.random.default_rng(7).uniform(0.5, 2, (B, T))))
    loss_cfg = loss_config("entropy_reg", beta=0.1, entropy_coef=0.3)
    w = jnp.asarray(np.random.default_rng(8).uniform(0.0, 2.0, (B, T)), jnp.float32)

    def parts(xx):
        return loss_terms(xx, loss_cfg)[0]
    a, b = parts(x), parts(x._replace(token_weight=w))
    np.testing.assert_array_equal(b["kl"], a["kl"])
    np.testing.assert_array_equal(b["entropy"], a["entropy"])
    assert abs(float(b["pg"]) - float(a["pg"])) > 1e-4
