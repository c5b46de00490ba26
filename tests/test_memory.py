"""Memory options at real size: optimizer-state dtype, reference offload, the forward-only
log-prob pass, and the abstract `--dry_run` (tiny preset on 1 and 8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.optim import OptimConfig, OptimConfigError, make_optimizer


@pytest.mark.parametrize("state_dtype, want", [("", {"bfloat16", "float32"}), ("float32", {"float32"}),
                                               ("bfloat16", {"bfloat16"})])
def test_optimizer_moments_keep_their_dtype(state_dtype, want):
    """Adam's moments are created in state_dtype ("" = each parameter's dtype) and stay in it
    after float32 gradients (plain optax would turn bfloat16 moments into float32 ones)."""
    params = {"w": jnp.ones((4, 4), jnp.bfloat16), "input_norm": jnp.ones((4,), jnp.float32)}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, state_dtype=state_dtype))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    updates, new_state = tx.update(grads, state, params)
    moments = lambda s: {str(x.dtype) for x in jax.tree.leaves(s) if x.ndim}  # noqa: E731
    assert moments(state) == moments(new_state) == want
    assert jax.tree.map(lambda x: x.dtype, jax.tree.leaves(new_state)) == \
        jax.tree.map(lambda x: x.dtype, jax.tree.leaves(state))
    assert np.all(np.asarray(updates["w"], np.float32) < 0)  # the update itself still happens
    with pytest.raises(OptimConfigError, match="state_dtype='float16'"):
        OptimConfig(state_dtype="float16")


# ---- the reference model in host memory ----

def test_reference_offload_round_trip():
    """On CPU offload does nothing unless forced; forced, the parameters sit in pinned host
    memory and come back to the device equal, giving the same log-probs."""
    from flax import nnx

    from train_helpers import SGD_LIKE, random_batch, single_mesh, tiny_model
    from uecjax.objectives.methods import loss_config
    from uecjax.offload import HostParams
    from uecjax.train_step import TrainStep

    trainer = TrainStep(tiny_model(), loss_config("grpo"), SGD_LIKE, single_mesh())
    params, _, _ = trainer.init(nnx.state(tiny_model()))
    assert not HostParams(params, trainer.param_shardings, offload=True).offloaded  # CPU: no-op
    ref = HostParams(params, trainer.param_shardings, offload=True, allow_cpu=True)
    assert ref.offloaded
    assert {x.sharding.memory_kind for x in jax.tree.leaves(ref.params)} == {"pinned_host"}
    back = ref.on_device()
    assert {x.sharding.memory_kind for x in jax.tree.leaves(back)} == {"device"}
    batch = random_batch()
    want, got = trainer.compute_logprobs(params, batch), trainer.compute_logprobs(back, batch)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
