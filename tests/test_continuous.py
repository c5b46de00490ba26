"""Continuous batching (`Sampler(batching="continuous")`) against the static path and
transformers: the same tokens for the same seed whatever the slot count (the draws follow
(seed, prompt, sample, position)), rows in prompt-major order, per-row limits, no recompiles
inside a bucket, and fewer idle slot-steps on uneven lengths."""

import numpy as np
import pytest
import torch

from tiny_hf import write_tiny_qwen2
from uecjax.models import from_pretrained
from uecjax.sampler import Sampler, SamplingParams

FIELDS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "truncated")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    hf = write_tiny_qwen2(path, std=0.3, num_key_value_heads=1, tie_word_embeddings=True)
    return hf, from_pretrained(str(path))


def workload(seed=0, prompts=6, n=4, R=24):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, 100, int(rng.integers(2, 20))).tolist() for _ in range(prompts)]
    return ids, rng.integers(1, R + 1, prompts * n).astype(np.int32)


def assert_same(got, want, what=""):
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=f"{what} {field}")
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=2e-5, err_msg=what)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.8, 5, 0.9)])
def test_continuous_equals_static_for_any_slot_count(models, temperature, top_k, top_p):
    """Slot counts 8 (refills only: 8 is the smallest batch), 16 (refills, then compacts to 8)
    and the default 32 (every sequence at once, then compacts to 16 and 8) give the static path's tokens, masks and log-probs, with stop ids and per-row
    limits ending rows at different steps; the continuous path idles less."""
    _, model = models
    prompts, limits = workload()
    free = Sampler(model, batching="static")(prompts, SamplingParams(max_new_tokens=24, n=4))
    stop = int(free.response_tokens[0, 5])  # a token some rows emit early
    params = SamplingParams(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p,
                            n=4, seed=3, stop_token_ids=(stop,))
    want = Sampler(model, batching="static")(prompts, params, response_limits=limits)
    assert want.batching == "static" and (want.response_lengths < limits).any()
    assert (want.response_lengths == limits).any() and (want.response_lengths <= limits).all()
    for slots in (8, 16, None):
        sampler = Sampler(model, batching="continuous", slots=slots)
        got = sampler(prompts, params, response_limits=limits)
        assert got.batching == "continuous"
        assert_same(got, want, f"slots={slots}")
        assert got.useful_slot_steps == int(got.response_lengths.sum()) - len(limits)
        assert got.slot_utilization > want.slot_utilization


def test_greedy_continuous_equals_transformers_generate(models):
    hf, model = models
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [3], [20, 21, 22]] * 2
    out = Sampler(model, batching="continuous", slots=4)(
        prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    for row, prompt in enumerate(prompts[:5]):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                              do_sample=False, pad_token_id=0)
        np.testing.assert_array_equal(out.response_tokens[row], ref[0, len(prompt):].numpy())
        np.testing.assert_array_equal(out.response_tokens[row + 5], out.response_tokens[row])


def test_auto_batching_and_no_recompiles_inside_a_bucket(models):
    """auto: static below STATIC_BELOW sequences, continuous from there; 12 continuous calls of
    other prompt lengths, prompt counts, budgets and limits in the same buckets reuse the
    compiled prefill / run / compact."""
    _, model = models
    sampler = Sampler(model)
    assert sampler([[1, 2]], SamplingParams(max_new_tokens=4, n=2)).batching == "static"
    rng = np.random.default_rng(0)
    sampler([[1] * 40] * 4, SamplingParams(max_new_tokens=10, n=4))
    compiles = sampler.compile_count
    for call in range(12):
        count = int(rng.integers(3, 5))
        batch = [rng.integers(1, 100, int(rng.integers(33, 65))).tolist() for _ in range(count)]
        new = int(rng.integers(9, 17))
        out = sampler(batch, SamplingParams(max_new_tokens=new, n=4, seed=call),
                      response_limits=rng.integers(1, new + 1, count * 4))
        assert out.batching == "continuous" and out.response_tokens.shape == (count * 4, new)
    assert sampler.compile_count == compiles


def test_response_limits_are_checked(models):
    _, model = models
    sampler = Sampler(model)
    with pytest.raises(ValueError, match=r"one limit per returned row \(4 = prompts x n\)"):
        sampler([[1, 2], [3]], SamplingParams(max_new_tokens=4, n=2), response_limits=[1, 2])
    with pytest.raises(ValueError, match=r"in \[1, max_new_tokens=4\], got \[0, 5\]"):
        sampler([[1, 2], [3]], SamplingParams(max_new_tokens=4, n=2), response_limits=[0, 5, 1, 1])
    with pytest.raises(ValueError, match="batching='paged'"):
        Sampler(model, batching="paged")
