"""Mesh construction and the logical-axis rules for params, optimizer state, batches, loading."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tiny_hf import write_tiny_qwen2
from uecjax.models import TextConfig, from_pretrained
from uecjax.models.config import read_hf_config
from uecjax.optim import OptimConfig, make_optimizer
from uecjax.parallel.mesh import (ShardingError, batch_sharding, check_batch_size, make_mesh, mesh_shape,
                             model_sharding_fn, opt_state_shardings, param_fallbacks, param_shardings,
                             partition_spec)
from train_helpers import TINY, tiny_model


def test_mesh_shape_resolves_the_rest_and_rejects_bad_meshes():
    assert mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert mesh_shape({"fsdp": 4, "tensor": 2}, 8) == (1, 4, 2)
    assert make_mesh((1, 4, 2)).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ShardingError, match="needs 12 devices, but 8"):
        mesh_shape((3, 2, 2), 8)
    with pytest.raises(ShardingError, match="do not divide the 8 devices"):
        mesh_shape((3, -1, 1), 8)
    with pytest.raises(ShardingError, match="at most one -1"):
        mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ShardingError, match="unknown mesh axes"):
        mesh_shape({"model": 8}, 8)


def test_partition_spec_rules_and_fallback():
    mesh = make_mesh((1, 4, 2))
    assert partition_spec(("layers", "embed", "q_heads"), (2, 32, 64), mesh)[0] == P(None, "fsdp", "tensor")
    assert partition_spec(("batch",), (16,), mesh)[0] == P(("data", "fsdp"))
    spec, fallbacks = partition_spec(("vocab", "embed"), (151, 30), mesh)  # neither divides
    assert spec == P(None, None) and len(fallbacks) == 2 and "151" in fallbacks[0]
    with pytest.raises(ShardingError, match="no rule"):
        partition_spec(("heads",), (8,), mesh)


def test_param_and_optimizer_shardings_follow_one_rule_set():
    mesh = make_mesh((1, 4, 2))
    params = nnx.state(tiny_model())
    shardings = param_shardings(mesh, params)
    assert shardings["layers"]["q_w"].get_value().spec == P(None, "fsdp", "tensor")
    assert shardings["layers"]["down_w"].get_value().spec == P(None, "tensor", "fsdp")
    assert shardings["embed"].get_value().spec == P("tensor", "fsdp")
    assert shardings["lm_head"].get_value().spec == P("fsdp", "tensor")
    assert shardings["final_norm"].get_value().spec == P(None)
    assert param_fallbacks(mesh, params) == {}
    odd = nnx.state(nnx.eval_shape(lambda: type(tiny_model())(TINY.replace(vocab_size=63), rngs=nnx.Rngs(0))))
    assert "vocab=63" in " ".join(param_fallbacks(mesh, odd)["['embed'].value"])

    optimizer = make_optimizer(OptimConfig(max_grad_norm=1.0))
    opt = opt_state_shardings(mesh, optimizer, params, shardings)
    paths = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(opt)}
    mu = [spec for path, spec in paths.items() if "mu" in path and "'q_w'" in path]
    nu = [spec for path, spec in paths.items() if "nu" in path and "'embed'" in path]
    counts = [spec for path, spec in paths.items() if "count" in path]
    assert mu == [P(None, "fsdp", "tensor")] and nu == [P("tensor", "fsdp")]
    assert counts and all(spec == P() for spec in counts)
    state = jax.jit(optimizer.init, out_shardings=opt)(jax.device_put(params, shardings))
    assert len(jax.tree.leaves(state)) == len(paths)


def test_batch_sharding_and_divisibility():
    mesh = make_mesh((2, 2, 2))
    x = jax.device_put(np.zeros((8, 3)), batch_sharding(mesh))
    assert x.addressable_shards[0].data.shape == (2, 3)
    check_batch_size(8, mesh, micro_batches=2)
    with pytest.raises(ShardingError, match="multiple of micro_batches"):
        check_batch_size(12, mesh, micro_batches=2)


def test_from_pretrained_with_the_sharding_fn(tmp_path):
    write_tiny_qwen2(tmp_path, num_key_value_heads=2)
    config = TextConfig.from_hf(read_hf_config(str(tmp_path)))
    mesh = make_mesh((2, 2, 2))
    sharded = from_pretrained(str(tmp_path), sharding_fn=model_sharding_fn(mesh, config))
    plain = from_pretrained(str(tmp_path))
    want = param_shardings(mesh, nnx.state(plain))
    for (path, x), s, y in zip(jax.tree_util.tree_leaves_with_path(nnx.state(sharded)), jax.tree.leaves(want),
                               jax.tree.leaves(nnx.state(plain))):
        assert x.sharding == s, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_model_must_divide_by_the_mesh():
    """Heads, KV heads and MLP width must split over tensor, the hidden size over fsdp (errors
    naming the config field); a vocabulary that does not split is only a warning."""
    from uecjax.models.presets import preset
    from uecjax.parallel.mesh import check_model_mesh

    qwen05 = preset("qwen2.5-0.5b")  # 14 heads, 2 KV heads, MLP 4864, hidden 896
    assert check_model_mesh(qwen05, make_mesh((4, 1, 2))) == []
    with pytest.raises(ShardingError, match=r"config.mesh.tensor=4 does not divide the model's "
                                            r"num_attention_heads=14; choose a tensor size that "
                                            r"divides it \(1, 2, 7\)"):
        check_model_mesh(qwen05, make_mesh((2, 1, 4)))
    with pytest.raises(ShardingError, match="num_key_value_heads=2"):
        check_model_mesh(qwen05.replace(num_attention_heads=16, hidden_size=1024), make_mesh((2, 1, 4)))
    with pytest.raises(ShardingError, match="intermediate_size=4863"):
        check_model_mesh(qwen05.replace(intermediate_size=4863), make_mesh((4, 1, 2)))
    with pytest.raises(ShardingError, match="config.mesh.fsdp=8 does not divide the model's hidden_size=900"):
        check_model_mesh(qwen05.replace(hidden_size=900, num_attention_heads=15, num_key_value_heads=3),
                         make_mesh((1, 8, 1)))
    # A checkpoint vocabulary such as 151,646 still loads: replicated over tensor, with a warning.
    qwen7 = preset("qwen2.5-7b")  # 28 heads, 4 KV heads, MLP 18944
    assert check_model_mesh(qwen7, make_mesh((2, 1, 4))) == []
    warnings = check_model_mesh(qwen7.replace(vocab_size=151646), make_mesh((2, 1, 4)))
    assert len(warnings) == 1 and "vocab_size=151646" in warnings[0] and "tensor=4" in warnings[0]


def test_global_batch_takes_this_process_rows():
    """One process holds every row; the global array equals the host batch on the batch sharding."""
    from uecjax.parallel.mesh import global_batch, process_rows, put_replicated, replicated

    mesh = make_mesh((2, 2, 2))
    sharding = batch_sharding(mesh)
    assert process_rows(sharding, 8) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    host = {"tokens": np.arange(24).reshape(8, 3), "adv": np.arange(8.0), "ref": None}
    placed = global_batch(host, sharding)
    assert placed["ref"] is None and placed["tokens"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(placed["tokens"]), host["tokens"])
    assert global_batch(placed, sharding)["adv"] is placed["adv"]  # already placed: unchanged
    control = put_replicated({"h0": np.float32(np.nan), "step": np.int32(3)}, replicated(mesh))
    assert np.isnan(np.asarray(control["h0"])) and control["step"].sharding == replicated(mesh)
