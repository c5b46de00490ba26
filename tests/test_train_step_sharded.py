"""The step on 8 simulated CPU devices (data x fsdp x tensor meshes) equals the single-device
step: parameters, optimizer state and metrics, to float32 tolerance."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from train_helpers import SGD_LIKE, host, perturbed, random_batch, single_mesh, tiny_model, with_logprobs
from uecjax.objectives.methods import loss_config
from uecjax.parallel.mesh import make_mesh
from uecjax.train_step import TrainStep

# Every loss term on: PPO clip (pi != pi_old), KL to a reference, gated exploration, stabilizer.
HP = loss_config("uec", beta=0.05, alpha=0.05, lam=2.0)
B, MICRO = 16, 2


@pytest.fixture(scope="module")
def reference():
    """The single-device run: (model, batch, h0, params, opt_state, metrics) after one step."""
    model = tiny_model(seed=1)
    ts = TrainStep(model, HP, SGD_LIKE, single_mesh(), micro_batches=MICRO, chunk_size=16)
    params, opt_state, control = ts.init(nnx.state(model))
    batch = with_logprobs(ts, params, random_batch(B=B, seed=11), ref_params=perturbed(params, 0.05, 3),
                          noise=0.05)
    h0 = 0.7 * float(np.sum(batch.response_mask * batch.old_entropy) / batch.response_mask.sum())
    params, opt_state, control = ts.init(nnx.state(model), h0=h0)
    out = host(ts.step(params, opt_state, control, batch))
    return model, batch, h0, out


@pytest.mark.parametrize("axes", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_step_equals_single_device(reference, axes):
    model, batch, h0, (p_ref, o_ref, c_ref, m_ref) = reference
    mesh = make_mesh(axes)
    ts = TrainStep(model, HP, SGD_LIKE, mesh, micro_batches=MICRO, chunk_size=16)
    params, opt_state, control = ts.init(nnx.state(model), h0=h0)
    params, opt_state, control, metrics = ts.step(params, opt_state, control, batch)

    # The layout is the rules' one, not replicated everywhere.
    q_w = params["layers"]["q_w"][...]
    assert q_w.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    adam_mu = [x for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
               if "mu" in jax.tree_util.keystr(path) and "q_w" in jax.tree_util.keystr(path)]
    assert len(adam_mu) == 1 and adam_mu[0].sharding.spec == q_w.sharding.spec
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
        assert q_w.addressable_shards[0].data.shape != q_w.shape

    for name, got, want in (("params", params, p_ref), ("opt_state", opt_state, o_ref)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host(got)), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6, err_msg=name + jax.tree_util.keystr(path))
    metrics = host(metrics)
    assert sorted(metrics) == sorted(m_ref)
    for k in metrics:
        np.testing.assert_allclose(metrics[k], m_ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert m_ref["stabilizer_penalty"] > 0 and m_ref["loss/kl"] > 0 and m_ref["clip_frac_high"] > 0
    np.testing.assert_array_equal(host(control).rng, c_ref.rng)


def test_lora_step_on_a_mesh_equals_single_device():
    """LoRA on a 2x2x2 mesh: the adapters (split like the weights they adapt, the rank axis
    whole), their optimizer state and the metrics equal the single-device step's."""
    from train_helpers import random_lora_b
    from uecjax.models.lora import LoraSpec
    from uecjax.models.lora_init import add_lora

    def run(mesh):
        model = random_lora_b(add_lora(tiny_model(seed=1), LoraSpec(rank=4, alpha=8.0), mesh=mesh))
        ts = TrainStep(model, HP, SGD_LIKE, mesh, micro_batches=MICRO, chunk_size=16)
        params, opt_state, control = ts.init(ts.trainable(model))
        batch = with_logprobs(ts, params, random_batch(B=B, seed=11),
                              ref_params=perturbed(params, 0.05, 3), noise=0.05)
        out = ts.step(params, opt_state, control, batch)
        return out[0], host(out)

    _, want = run(single_mesh())
    sharded, got = run(make_mesh((2, 2, 2)))
    assert sharded["layers"]["q_lora_a"][...].sharding.spec == PartitionSpec(None, "fsdp", None)
    # Every adapter is split over fsdp: along the hidden axis, or else along its rank axis.
    assert sharded["layers"]["q_lora_b"][...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert sharded["layers"]["down_lora_a"][...].sharding.spec == PartitionSpec(None, "tensor", "fsdp")
    assert sharded["layers"]["down_lora_b"][...].sharding.spec == PartitionSpec(None, None, "fsdp")
    for name, x, y in zip(("params", "opt_state", "control", "metrics"), got, want):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=name + jax.tree_util.keystr(path))
