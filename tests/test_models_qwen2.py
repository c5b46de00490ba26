"""The Qwen2 decoder against transformers' Qwen2ForCausalLM (torch, CPU) as the reference.

Every case writes a tiny random checkpoint with transformers, loads it with
`uecjax.models.from_pretrained` and compares logits in float32. Rope scaling types, GQA
ratios, tied embeddings and left padding each get a config; KV-cache decoding is checked
against the full forward, and bfloat16 / remat against the float32 forward.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_hf import TINY, write_tiny_qwen2
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from uecjax.models import ConfigError, TextConfig, default_positions, from_pretrained
from uecjax.models.rope import inverse_frequencies

B, T = 3, 12  # one batch shape everywhere, so compiled forwards are shared between tests
ROPE = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    # original 128: the yarn ramp spans head_dim pairs 0..3 for head_dim 16, theta 1e4.
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
             "rope_theta": 10000.0},
    # theta 1e4, head_dim 16, old length 128: wavelengths fall in all three llama3 bands.
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128,
               "rope_theta": 10000.0},
}
CONFIGS = {
    "gqa2_untied": {},
    "tied": {"tie_word_embeddings": True},
    "gqa1": {"num_key_value_heads": 4},
    "gqa4": {"num_key_value_heads": 1},
    "head_dim32": {"head_dim": 32},  # head_dim != hidden_size // num_attention_heads
    "theta1e6": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "rope_linear": {"rope_parameters": ROPE["linear"]},
    "rope_yarn": {"rope_parameters": ROPE["yarn"]},
    "rope_llama3": {"rope_parameters": ROPE["llama3"]},
}


def torch_logits(hf, ids, mask=None, positions=None):
    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
    if positions is not None:
        kw["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long), **kw).logits.numpy()


@nnx.jit
def forward(model, ids, mask, positions):
    return model(ids, mask, positions)


def jax_logits(model, ids, mask=None, positions=None):
    """Logits through the jitted forward (defaults as Qwen2.__call__'s, made explicit)."""
    ids = jnp.asarray(ids)
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask)
    positions = default_positions(mask) if positions is None else jnp.asarray(positions)
    return np.asarray(forward(model, ids, mask, positions))


def assert_logits_close(ours, ref, rel=1e-5):
    """float32 agreement: absolute tolerance rel x the logits' scale."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * scale)


def random_ids(seed, shape, vocab=TINY["vocab_size"]):
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


def left_padded_mask(lengths, total):
    return np.stack([np.r_[np.zeros(total - n), np.ones(n)] for n in lengths]).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, checkpoint dir), written lazily and shared in this module."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"qwen2_{name}")
            cache[name] = (write_tiny_qwen2(path, seed=len(cache), **CONFIGS[name]), str(path))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name):
    hf, path = checkpoints(name)
    model = from_pretrained(path)
    assert model.config.tie_word_embeddings == (name == "tied")
    assert (model.lm_head is None) == (name == "tied")
    assert model.config.num_key_value_heads == hf.config.num_key_value_heads
    ids = random_ids(1, (B, T))
    assert_logits_close(jax_logits(model, ids), torch_logits(hf, ids))
    # Positions past the rope's original length make scaling (and theta) matter.
    positions = np.broadcast_to(np.arange(T) + 200, (B, T)).astype(np.int32)
    assert_logits_close(jax_logits(model, ids, positions=positions),
                        torch_logits(hf, ids, positions=positions))


def test_call_defaults(checkpoints):
    """Qwen2.__call__ with its default mask (all real) and positions (0, 1, ...)."""
    hf, path = checkpoints("gqa2_untied")
    model = from_pretrained(path)
    ids = random_ids(6, (B, T))
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    assert logits.dtype == jnp.float32 and logits.shape == (B, T, TINY["vocab_size"])
    assert_logits_close(logits, torch_logits(hf, ids))


@pytest.mark.parametrize("name", ["gqa2_untied", "gqa4"])
def test_left_padded_batch_matches_transformers(checkpoints, name):
    hf, path = checkpoints(name)
    model = from_pretrained(path)
    lengths = [T, T - 5, 3]
    mask = left_padded_mask(lengths, T)
    ids = random_ids(2, (B, T))
    positions = (np.cumsum(mask, -1) - 1).astype(np.int32)  # -1 on padding
    real = mask.astype(bool)
    ref = torch_logits(hf, ids, mask, positions)
    ours = jax_logits(model, ids, mask, positions)
    assert_logits_close(ours[real], ref[real])
    # The default positions (clamped to 0 on padding) give the same real-token logits.
    np.testing.assert_array_equal(np.asarray(default_positions(jnp.asarray(mask)))[real], positions[real])
    assert_logits_close(jax_logits(model, ids, mask)[real], ref[real])
    # A padded row's real tokens score as the same sequence unpadded.
    n = lengths[1]
    alone = torch_logits(hf, ids[1:2, T - n:])
    assert_logits_close(ours[1, T - n:], alone[0])


@pytest.mark.parametrize("rope_type", list(ROPE))
def test_inverse_frequencies_match_transformers(rope_type):
    params = dict(ROPE[rope_type])
    for max_pos in (512, 4096):
        hf_cfg = Qwen2Config(**{**TINY, "max_position_embeddings": max_pos, "rope_parameters": params})
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
        cfg = TextConfig.from_hf(hf_cfg.to_dict())
        assert cfg.rope_theta == params["rope_theta"]
        freq, factor = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_dict(),
                                           cfg.max_position_embeddings)
        assert freq.dtype == np.float32 and freq.shape == (cfg.head_dim // 2,)
        np.testing.assert_allclose(freq, ref_freq.numpy(), rtol=1e-6, atol=0)
        assert factor == pytest.approx(ref_factor, rel=1e-7)
        # The scaled frequencies differ from the plain ones (the config is not a no-op).
        plain, _ = inverse_frequencies(cfg.head_dim, cfg.rope_theta, {}, max_pos)
        assert not np.allclose(freq, plain)


@pytest.mark.parametrize("max_pos", [32768, 131072])
def test_hub_legacy_yarn_matches_transformers(tmp_path, max_pos):
    """Qwen2.5's documented long-context config: flat rope_scaling spelled with "type"."""
    hub = {**TINY, "model_type": "qwen2", "hidden_size": 128, "num_attention_heads": 2,
           "max_position_embeddings": max_pos, "rope_theta": 1e6,
           "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](Qwen2Config.from_pretrained(str(tmp_path)), "cpu")
    cfg = TextConfig.from_hf(hub)
    assert cfg.head_dim == 64 and cfg.rope_dict()["rope_type"] == "yarn"
    freq, factor = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_dict(),
                                       cfg.max_position_embeddings)
    np.testing.assert_allclose(freq, ref_freq.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-7) and factor > 1.1


def test_yarn_without_factor_uses_length_ratio():
    params = {k: v for k, v in ROPE["yarn"].items() if k != "factor"}
    hf_cfg = Qwen2Config(**{**TINY, "max_position_embeddings": 1024,
                            "rope_parameters": {**params, "factor": None}})
    ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    freq, factor = inverse_frequencies(16, 10000.0, params, 1024)
    np.testing.assert_allclose(freq, ref_freq.numpy(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-7)


def test_bfloat16_compute_close_to_float32(checkpoints):
    hf, path = checkpoints("gqa2_untied")
    ids = random_ids(3, (B, T))
    ref = jax_logits(from_pretrained(path), ids)
    model = from_pretrained(path, dtype="bfloat16")
    assert model.config.compute_dtype == jnp.bfloat16
    assert model.layers.q_w[...].dtype == jnp.bfloat16
    ids, mask = jnp.asarray(ids), jnp.ones((B, T), jnp.int32)
    ours = forward(model, ids, mask, default_positions(mask))
    assert ours.dtype == jnp.float32
    ours = np.asarray(ours)
    scale = float(np.abs(ref).max())
    assert np.abs(ours - ref).max() < 0.05 * scale
    assert np.linalg.norm(ours - ref) < 0.02 * np.linalg.norm(ref)
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.9
    # bfloat16 compute on float32 parameters is equally close.
    mixed = jax_logits(from_pretrained(path, dtype="bfloat16", param_dtype="float32"), ids)
    assert np.linalg.norm(mixed - ref) < 0.02 * np.linalg.norm(ref)


def _loss(model, ids, mask):
    logits = model(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -(tok * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits


def test_remat_same_logits_and_gradients(checkpoints):
    _, path = checkpoints("gqa2_untied")
    mask = jnp.asarray(left_padded_mask([T, T - 4, 2], T))
    ids = jnp.asarray(random_ids(4, (B, T)))
    value_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))
    results = []
    # The old boolean switch maps onto the modes: False -> none, True -> full.
    for remat, mode in ((False, "none"), ("per_layer", "per_layer"), (True, "full")):
        model = from_pretrained(path, remat=remat)
        assert model.config.remat == mode
        (loss, logits), grads = value_and_grad(model, ids, mask)
        results.append((np.asarray(logits), float(loss), nnx.to_flat_state(grads)))
        # per_layer / full wrap each scanned layer in jax.checkpoint with their policy.
        x = model.embed_tokens(ids)
        jaxpr = str(jax.make_jaxpr(lambda x: model.hidden_states(x, default_positions(mask), mask)[0])(x))
        assert ("prevent_cse=" in jaxpr) is (mode != "none")  # a param only the remat primitive has
        assert ("only_if_no_batch_dims=True" in jaxpr) is (mode == "per_layer")
        assert ("nothing_saveable" in jaxpr) is (mode == "full")
    with pytest.raises(ConfigError, match="remat='some'"):
        from_pretrained(path, remat="some")
    l0, loss0, g0 = results[0]
    for l1, loss1, g1 in results[1:]:
        np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-6 * np.abs(l0).max())
        assert loss1 == pytest.approx(loss0, rel=1e-6)
        a0, a1 = dict(g0), dict(g1)
        assert a0.keys() == a1.keys() and len(a0) == 15
        for key in a0:
            a, b = np.asarray(a0[key][...]), np.asarray(a1[key][...])
            assert np.abs(a).max() > 0, key
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * np.abs(a).max(), err_msg=str(key))


def _decode_step(model, x, positions, key_mask, cache, cache_index):
    hidden, cache = model.hidden_states(x, positions, key_mask, cache=cache, cache_index=cache_index)
    return model.logits(hidden), cache


@pytest.mark.parametrize("name", ["gqa2_untied", "gqa4"])
def test_kv_cache_decoding_matches_full_forward(checkpoints, name):
    _, path = checkpoints(name)
    model = from_pretrained(path)
    prompt_len, total, slots = 5, T, T + 3  # spare slots beyond the sequence stay masked out
    lengths = [total, total - 3, total - 5]  # rows left-padded by 0, 3 and 5 (prompt all pad)
    mask = left_padded_mask(lengths, total)
    ids = random_ids(5, (B, total))
    positions = np.asarray(default_positions(jnp.asarray(mask)))
    full = jax_logits(model, ids, mask, positions)
    real = mask.astype(bool)

    # Slots hold the tokens in sequence order; slots never written are masked off.
    key_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, slots - total))))
    step = nnx.jit(_decode_step)
    cache = model.init_cache(B, slots)
    assert cache.num_slots == slots and cache.k.dtype == jnp.float32
    logits, cache = step(model, model.embed_tokens(jnp.asarray(ids[:, :prompt_len])),
                         jnp.asarray(positions[:, :prompt_len]), key_mask, cache, jnp.int32(0))
    logits = np.asarray(logits)
    pr = real[:, :prompt_len]
    assert_logits_close(logits[pr], full[:, :prompt_len][pr])
    for t in range(prompt_len, total):
        logits, cache = step(model, model.embed_tokens(jnp.asarray(ids[:, t:t + 1])),
                             jnp.asarray(positions[:, t:t + 1]), key_mask, cache, jnp.int32(t))
        assert_logits_close(np.asarray(logits)[:, 0], full[:, t])
    # The cache ([layers, batch, kv_heads, slots, head_dim]) holds keys at written slots only.
    k = np.asarray(cache.k)
    assert np.abs(k[:, :, :, :total]).max() > 0 and not k[:, :, :, total:].any()
