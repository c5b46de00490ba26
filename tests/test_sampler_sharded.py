"""The sampler on 8 simulated CPU devices: with the parameters laid out by `uecjax.parallel.mesh` on
data x fsdp x tensor meshes, `Sampler(model, mesh=mesh)` gives the single-device sampler's
tokens and masks exactly and its log-probs to float32 rounding, while each device holds only
its rows (data x fsdp) and its KV heads (tensor) of the cache and of the outputs."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from train_helpers import tiny_model
from uecjax.sampler import Sampler, SamplingParams
from uecjax.parallel.mesh import BATCH_AXES, make_mesh, param_shardings

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
MESHES = [(2, 2, 2), (4, 1, 2)]


def cases(stop: int):
    """name -> (prompts, params): greedy, sampled n=2 with a stop token, one prompt (fewer
    prompts than data x fsdp: the prompt rows are padded so that prompts x n divide)."""
    return {
        "greedy": (PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0)),
        "sampled": (PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=5,
                                            stop_token_ids=(stop,))),
        "one_prompt": ([[3, 4, 5]], SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=2)),
    }


@pytest.fixture(scope="module")
def reference():
    """(graphdef, host parameters, cases, single-device outputs per case)."""
    model = tiny_model(seed=1, scale=3.0)  # sharp enough to stop, flat enough to vary
    graphdef, state = nnx.split(model)
    sampler = Sampler(model)
    free = sampler(PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=5))
    # A token that ends some sampled rows early and not others (early exit, padding).
    stop = int(free.response_tokens[0, 3])
    named = cases(stop)
    outs = {name: sampler(prompts, params) for name, (prompts, params) in named.items()}
    lengths = outs["sampled"].response_lengths
    assert (lengths < 10).any() and (lengths == 10).any(), lengths
    return graphdef, jax.device_get(state), named, outs


def sharded_sampler(reference, axes):
    graphdef, state, _, _ = reference
    mesh = make_mesh(axes)
    model = nnx.merge(graphdef, jax.device_put(state, param_shardings(mesh, state)))
    assert model.layers.k_w[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    return mesh, Sampler(model, mesh=mesh)


@pytest.mark.parametrize("axes", MESHES)
def test_sharded_sampler_equals_single_device(reference, axes):
    """Every case equals the single-device outputs; in the sampled one the decode's cache and
    outputs (before the host gather) have their rows over data x fsdp and the cache its KV
    heads over tensor: device 0 holds rows / (data x fsdp) rows and kv_heads / tensor heads."""
    _, _, named, want = reference
    mesh, sampler = sharded_sampler(reference, axes)
    decode, seen = sampler._decode, {}

    def spy(graphdef, state, cache, key_mask, *args, **kwargs):
        seen["key_mask"] = key_mask
        seen["out"] = decode(graphdef, state, cache, key_mask, *args, **kwargs)
        return seen["out"]

    sampler._decode = spy
    for name, (prompts, params) in named.items():
        got = sampler(prompts, params)
        ref = want[name]
        for field in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "truncated"):
            np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=f"{name}.{field}")
        np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=0, atol=1e-5, err_msg=name)
        if name == "sampled":
            check_split(mesh, rows=8, key_mask=seen["key_mask"], out=seen["out"])  # 3 prompts -> 4, x n=2


def check_split(mesh, rows, key_mask, out):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    tokens, logps, valid, done, _, cache = out
    k = cache.k[0]  # [rows, kv_heads, slots, head_dim] of layer 0 (the donated input's buffer)
    assert k.shape[0] == rows
    assert k.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(BATCH_AXES, "tensor")), k.ndim)
    assert k.addressable_shards[0].data.shape == (rows // shards, k.shape[1] // mesh.shape["tensor"],
                                                  *k.shape[2:])
    for x in (key_mask, tokens, logps, valid, done):
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(BATCH_AXES)), x.ndim)
        assert x.addressable_shards[0].data.shape == (rows // shards, *x.shape[1:])
        assert len({s.index[0].start for s in x.addressable_shards}) == shards  # distinct row blocks


def test_prompt_padding_for_the_mesh(reference):
    """Prompt rows: a power of two, then a multiple of (data x fsdp) / gcd(n, data x fsdp); the
    prefill splits prompts over data x fsdp, else over data, else not at all."""
    _, sampler = sharded_sampler(reference, (2, 2, 2))
    assert [sampler._num_prompt_rows(p, n) for p, n in ((3, 1), (3, 2), (1, 2), (1, 4), (1, 8), (5, 3))] \
        == [4, 4, 2, 1, 1, 8]
    assert [sampler._prompt_axes(b) for b in (8, 4, 2, 1)] == [BATCH_AXES, BATCH_AXES, "data", None]
    assert Sampler(tiny_model())._num_prompt_rows(3, 2) == 4  # no mesh: the bucket alone


@pytest.mark.parametrize("axes", [(2, 2, 2)])
def test_continuous_batching_on_a_mesh_equals_single_device(reference, axes):
    """Continuous batching on the mesh (4 slots over data x fsdp, refilled as rows end) gives
    the single-device static outputs: the draws follow each sequence, not its slot or device."""
    graphdef, state, named, want = reference
    mesh = make_mesh(axes)
    model = nnx.merge(graphdef, jax.device_put(state, param_shardings(mesh, state)))
    sampler = Sampler(model, mesh=mesh, batching="continuous", slots=4)
    for name in ("greedy", "sampled"):
        prompts, params = named[name]
        got = sampler(prompts, params)
        assert got.batching == "continuous"
        for field in ("response_tokens", "response_mask", "truncated"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want[name], field),
                                          err_msg=f"{name}.{field}")
        np.testing.assert_allclose(got.logprobs, want[name].logprobs, rtol=0, atol=1e-5)
