"""Every attention implementation that runs on CPU equals the exact reference in values and
gradients (splash in Pallas' interpret mode), and the reference equals a plain numpy softmax:
grouped-query heads, causal + left padding, packed segments, a prefill into a longer cache,
the vision tower's segments with empty slots, bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.models import attention as att
from uecjax.models.attention import Mask, attention, causal_mask, segment_mask
from uecjax.models.config import TextConfig
from uecjax.models.qwen2 import Qwen2


def qkv(B, T, S, H, K, D, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, T, H, D)), dtype)
    k = jnp.asarray(r.normal(size=(B, K, S, D)), dtype)
    v = jnp.asarray(r.normal(size=(B, K, S, D)), dtype)
    return q, k, v


def numpy_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(D)) v per query head, K/V heads repeated, in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    H, K = q.shape[2], k.shape[1]
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # [B, H, S, D]
    s = np.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(allowed)[:, None], s, -np.inf)
    with np.errstate(invalid="ignore"):  # a query with no visible key: NaN, never compared
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", p, v)


def left_padded(B, S, pads):
    return jnp.asarray(np.arange(S)[None] >= np.asarray(pads)[:, None])


def packed_segments(lengths_per_row, S):
    """Rows of consecutive segments 0, 1, ...; the tail after the last one is padding (-1)."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, S - len(ids)), constant_values=-1))
    return jnp.asarray(np.stack(rows), jnp.int32)


B, H, K, D = 2, 4, 2, 8
CASES = {
    "causal, left padding": lambda: (48, 48, causal_mask(left_padded(B, 48, [0, 13]))),
    "packed segments": lambda: (64, 64, causal_mask(
        packed_segments([[20, 30, 10], [64]], 64) >= 0,
        segments=packed_segments([[20, 30, 10], [64]], 64))),
    "prefill into a cache": lambda: (24, 80, causal_mask(left_padded(B, 80, [5, 0]), 8, 24)),
    "vision segments": lambda: (40, 40, segment_mask(packed_segments([[16, 16, 4], [36]], 40))),
}


def query_rows(mask: Mask):
    """Queries that see at least one key: only their outputs are defined."""
    return np.asarray(mask.dense()).any(-1)


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_softmax_formula(case):
    T, S, mask = CASES[case]()
    q, k, v = qkv(B, T, S, H, K, D)
    got = np.asarray(att.reference_attention(q, k, v, mask))
    want = numpy_attention(q, k, v, mask.dense())
    rows = query_rows(mask)
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)


def loss_of(impl, mask, rows, **kw):
    weights = jnp.asarray(rows, jnp.float32)[:, :, None, None] * jnp.cos(jnp.arange(D))
    return lambda q, k, v: jnp.sum(attention(q, k, v, mask, impl, **kw).astype(jnp.float32) * weights)


@pytest.mark.parametrize("case", CASES)
# block 16 divides the keys of most cases, 7 divides none (the padded last block); the
# default block (one block here) is the decoder test's.
@pytest.mark.parametrize("impl,kw", [("chunked", {"block": 16}), ("chunked", {"block": 7})])
def test_chunked_equals_reference(case, impl, kw):
    T, S, mask = CASES[case]()
    q, k, v = qkv(B, T, S, H, K, D)
    rows = query_rows(mask)
    want = np.asarray(att.reference_attention(q, k, v, mask))
    got = np.asarray(attention(q, k, v, mask, impl, **kw))
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss_of(impl, mask, rows, **kw), (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss_of("xla", mask, rows), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", ["causal, left padding", "packed segments", "vision segments"])
def test_splash_in_interpret_mode_equals_reference(case):
    T = 128  # splash works in blocks of 128
    mask = {
        "causal, left padding": causal_mask(left_padded(B, T, [0, 37])),
        "packed segments": causal_mask(packed_segments([[50, 60], [100]], T) >= 0,
                                       segments=packed_segments([[50, 60], [100]], T)),
        "vision segments": segment_mask(packed_segments([[64, 32], [128]], T)),
    }[case]
    q, k, v = qkv(B, T, T, H, K, D, seed=1)
    rows = query_rows(mask)
    want = np.asarray(att.reference_attention(q, k, v, mask))
    got = np.asarray(attention(q, k, v, mask, "splash"))
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss_of("splash", mask, rows), (0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss_of("xla", mask, rows), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)


def test_chunked_in_bfloat16_is_as_close_as_the_reference():
    T, S, mask = CASES["causal, left padding"]()
    q, k, v = qkv(B, T, S, H, K, D, dtype=jnp.bfloat16)
    rows = query_rows(mask)
    exact = numpy_attention(q, k, v, mask.dense())[rows]
    ref_err = np.abs(np.asarray(att.reference_attention(q, k, v, mask), np.float64)[rows] - exact).max()
    out = attention(q, k, v, mask, "chunked", block=16)
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float64)[rows] - exact).max() <= 2 * ref_err + 1e-3


def test_auto_picks_by_backend_and_shape(monkeypatch):
    mask = causal_mask(jnp.ones((1, 8), bool))
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert att.resolve("auto", 64, 64, mask, f32) == "xla"  # CPU, short: the exact path
    assert att.resolve("auto", 4096, 4096, mask, f32) == "chunked"  # CPU, long
    assert att.resolve("auto", 1, 4096, mask, f32) == "xla"  # a decode step
    assert att.resolve("chunked", 64, 64, mask, f32) == "chunked"  # explicit choices stay
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert att.resolve("auto", 4096, 4096, mask, bf16) == "cudnn"
    assert att.resolve("auto", 4096, 4096, mask, f32) == "chunked"  # cuDNN has no float32
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert att.resolve("auto", 4096, 4096, mask, f32) == "splash"
    assert att.resolve("auto", 100, 100, mask, f32) == "xla"  # not in splash's blocks
    assert att.resolve("auto", 512, 2048, mask, f32) == "chunked"  # a prefill into a cache


def test_an_unknown_implementation_names_the_choices():
    with pytest.raises(ValueError, match="attention='flash'.*choose from"):
        TextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, attention="flash")


def tiny_decoder(attention_impl):
    cfg = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attention=attention_impl)
    from flax import nnx
    return Qwen2(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", ["chunked", "splash"])
def test_decoder_logits_and_gradients_do_not_depend_on_the_implementation(impl):
    """Same weights, T = 128 with left padding: logits and the gradient of a masked loss."""
    from flax import nnx
    ref, other = tiny_decoder("xla"), tiny_decoder(impl)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 128)), jnp.int32)
    am = left_padded(2, 128, [0, 40]).astype(jnp.int32)

    def loss(model):
        logits = model(ids, am)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * am), logits

    (l_ref, logits_ref), g_ref = nnx.value_and_grad(loss, has_aux=True)(ref)
    (l_other, logits_other), g_other = nnx.value_and_grad(loss, has_aux=True)(other)
    real = np.asarray(am, bool)
    np.testing.assert_allclose(np.asarray(logits_other)[real], np.asarray(logits_ref)[real],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l_other, l_ref, rtol=1e-5)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(g_other)),
                                 nnx.to_flat_state(nnx.state(g_ref))):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-3, atol=1e-5, err_msg=str(path))


def test_auto_falls_back_when_cudnn_refuses_the_shape(monkeypatch):
    """On CPU jax refuses cuDNN at trace time, as it does for shapes cuDNN lacks on a GPU:
    `auto` then takes the chunked path, an explicit `cudnn` raises."""
    T, S, mask = CASES["causal, left padding"]()
    q, k, v = qkv(B, T, S, H, K, D, dtype=jnp.bfloat16)
    monkeypatch.setattr(att, "resolve", lambda *a: "cudnn")
    rows = query_rows(mask)
    got = np.asarray(attention(q, k, v, mask, "auto"), np.float32)
    want = np.asarray(att.chunked_attention(q, k, v, mask), np.float32)
    np.testing.assert_array_equal(got[rows], want[rows])
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)):
        attention(q, k, v, mask, "cudnn")
