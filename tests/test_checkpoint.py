"""Checkpoints: bit-exact round trip, resharding on restore, keep-last-N, atomicity, errors, SIGTERM."""

import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from uecjax.checkpoint import (CheckpointMismatchError, CheckpointNotFoundError,
                               CheckpointUnreadableError, Checkpointer, abstract_like,
                               clear_preemption, install_sigterm_handler, preemption_requested)
from uecjax.models import Qwen2, TextConfig

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def state():
    """Model state, adamw state after one update, control arrays with keys, meta, buffers."""
    params = nnx.state(Qwen2(TextConfig(**TINY), rngs=nnx.Rngs(0)))
    opt = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = opt.init(params)

    @jax.jit
    def update(params, opt_state):
        grads = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = update(params, opt_state)
    control = {
        "h0": jnp.float32(np.nan),  # "unset": NaN must survive bit-exactly
        "aer_alpha": jnp.float32(0.0123),
        "step": jnp.int32(1),
        "rng": jax.random.key(7),  # typed key
        "rng_raw": jax.random.key_data(jax.random.key(8)),  # raw uint32 key data
        "keys": jax.random.split(jax.random.key(9), 3),
    }
    meta = {"data": {"next_index": 17, "epoch": 1, "seed": 3, "worker_count": 0},
            "config": {"lr": 1e-2, "method": "uec", "axes": [-1, 1, 1]},
            "aer_alpha_host": 0.0123}
    buffers = {"tokens": np.arange(24, dtype=np.int32).reshape(4, 6),
               "reward": np.array([0.5, 1.0, 0.0, 0.25], np.float32),
               "empty": np.zeros((0, 6), np.int32)}
    return dict(params=params, opt_state=opt_state, control=control, meta=meta, buffers=buffers)


def _bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).reshape(-1).view(np.uint8)


def assert_bit_exact(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        where = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype, where
        assert x.shape == y.shape, where
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array)), where
        np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=where)


def _save(ckpt, step, s, **kw):
    return ckpt.save(step, params=s["params"], opt_state=s["opt_state"], control=s["control"],
                     meta=s["meta"], buffers=s.get("buffers"), **kw)


def _restore(ckpt, s, step=None, **kw):
    return ckpt.restore(step, params_target=abstract_like(s["params"]),
                        opt_state_target=abstract_like(s["opt_state"]),
                        control_target=abstract_like(s["control"]), **kw)


def test_round_trip_bit_exact(tmp_path, state):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert _save(ckpt, 5, state)
    # A fresh Checkpointer, as a resumed run would make.
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.all_steps() == [5] and ckpt.latest_step() == 5
        r = _restore(ckpt, state, buffers_target=state["buffers"])
        assert r["step"] == 5
        assert isinstance(r["params"], nnx.State)
        for name in ("params", "opt_state", "control", "buffers"):
            assert_bit_exact(r[name], state[name])
        assert r["meta"] == state["meta"]
        assert jax.dtypes.issubdtype(r["control"]["rng"].dtype, jax.dtypes.prng_key)
        assert r["control"]["rng_raw"].dtype == jnp.uint32
        # Keys continue the same stream.
        assert jnp.array_equal(jax.random.uniform(r["control"]["rng"]),
                               jax.random.uniform(state["control"]["rng"]))
        # Without a buffers target: numpy arrays as saved (empty ones included). Targets from
        # nnx.eval_shape (no sharding) come back as jax Arrays on the default device.
        abstract = nnx.state(nnx.eval_shape(lambda: Qwen2(TextConfig(**TINY), rngs=nnx.Rngs(0))))
        r2 = ckpt.restore(params_target=abstract, opt_state_target=abstract_like(state["opt_state"]),
                          control_target=abstract_like(state["control"]))
        assert_bit_exact(r2["params"], state["params"])
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(r2["params"]))
        assert_bit_exact(r2["buffers"], state["buffers"])
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(r2["buffers"]))
        # An empty array is stored as a placeholder; its real shape is still checked.
        with pytest.raises(CheckpointMismatchError,
                           match=r"'empty' has shape \(0, 6\) in the checkpoint but \(1,\)"):
            _restore(ckpt, state, buffers_target={**state["buffers"], "empty": np.zeros(1, np.int32)})


def test_no_buffers_and_async_save(tmp_path, state):
    small = {k: state[k] for k in ("params", "opt_state", "control", "meta")}
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert _save(ckpt, 1, small)
        ckpt.wait()
        r = _restore(ckpt, small)
        assert r["buffers"] is None
        assert_bit_exact(r["params"], small["params"])
        with pytest.raises(CheckpointMismatchError, match="no buffers"):
            _restore(ckpt, small, buffers_target=state["buffers"])


def _shard_spec(shape):
    """Last dim over 'model' and first over 'data' where they divide: a 2x4 layout for each leaf."""
    spec = [None] * len(shape)
    if len(shape) >= 1 and shape[-1] % 4 == 0:
        spec[-1] = "model"
    if len(shape) >= 2 and shape[0] % 2 == 0:
        spec[0] = "data"
    return P(*spec)


def test_restore_onto_other_sharding(tmp_path, state):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices, see tests/conftest.py")
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    replicated = NamedSharding(mesh, P())
    params, opt_state, control = state["params"], state["opt_state"], state["control"]
    rep = lambda t: jax.tree.map(lambda x: jax.device_put(x, replicated), t)  # noqa: E731
    shard = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.device_put(x, NamedSharding(mesh, _shard_spec(x.shape))), t)
    abstract_sharded = lambda t: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=NamedSharding(mesh, _shard_spec(x.shape))), t)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(shard(params)))

    def check(restored, targets, ref):
        for (path, r), t, x in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                   jax.tree.leaves(targets), jax.tree.leaves(ref)):
            assert r.sharding.is_equivalent_to(t.sharding, r.ndim), jax.tree_util.keystr(path)
            np.testing.assert_array_equal(np.asarray(r), np.asarray(x))

    with Checkpointer(tmp_path / "a") as ckpt:  # save replicated, restore sharded over 2x4
        ckpt.save(1, params=rep(params), opt_state=rep(opt_state),
                  control=jax.tree.map(lambda x: jax.device_put(x, replicated), control), meta={})
        targets = abstract_sharded(params)
        key_target = jax.ShapeDtypeStruct((), control["rng"].dtype, sharding=replicated)
        r = ckpt.restore(params_target=targets, opt_state_target=abstract_sharded(opt_state),
                         control_target={**abstract_like(control), "rng": key_target})
        check(r["params"], targets, params)
        check(r["opt_state"], abstract_sharded(opt_state), opt_state)
        assert r["control"]["rng"].sharding.is_equivalent_to(replicated, 0)
        assert jnp.array_equal(jax.random.key_data(r["control"]["rng"]),
                               jax.random.key_data(control["rng"]))
    with Checkpointer(tmp_path / "b") as ckpt:  # save sharded, restore replicated
        ckpt.save(1, params=shard(params), opt_state=shard(opt_state), control=control, meta={})
        targets = abstract_like(rep(params))
        r = ckpt.restore(params_target=targets, opt_state_target=abstract_like(rep(opt_state)),
                         control_target=abstract_like(control))
        check(r["params"], targets, params)
        assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(r["params"]))


def _small(i):
    return {"params": {"w": jnp.full((4,), float(i))}, "opt_state": {"count": jnp.int32(i)},
            "control": {"rng": jax.random.key(i)}, "meta": {"i": i}}


def test_keep_last_n_and_interval(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [_save(ckpt, i, _small(i)) for i in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert _save(ckpt, 7, _small(7), force=True)  # preemption / final save off the interval
        assert not _save(ckpt, 7, _small(7), force=True)  # never overwrites a step
        assert ckpt.all_steps() == [6, 7]
        assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["6", "7"]
        r = _restore(ckpt, _small(0), step=6)
        assert r["meta"] == {"i": 6} and float(r["params"]["w"][0]) == 6.0
        with pytest.raises(CheckpointNotFoundError, match=r"step 4 .*available steps: \[6, 7\]"):
            _restore(ckpt, _small(0), step=4)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    with Checkpointer(d) as ckpt:
        assert _save(ckpt, 1, _small(1))

    async def disk_full(*args, **kwargs):  # the JSON items fail while the arrays are written
        raise OSError("simulated crash while writing an item")

    ckpt = Checkpointer(d)
    with monkeypatch.context() as m:
        m.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", disk_full)
        with pytest.raises(OSError, match="simulated crash"):
            _save(ckpt, 2, _small(2))
    assert ckpt.latest_step() == 1
    ckpt.close()
    junk = [p for p in os.listdir(d) if "orbax-checkpoint-tmp" in p]
    assert junk and all(p.startswith("2.") for p in junk)  # the partial write went to a tmp dir
    # A process killed mid-save also leaves a tmp dir: fake one with partial contents.
    shutil.copytree(d / "1", d / "3.orbax-checkpoint-tmp-1234567")
    shutil.rmtree(d / "3.orbax-checkpoint-tmp-1234567" / "params")

    with Checkpointer(d) as ckpt:  # the restarted run
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        r = _restore(ckpt, _small(0))
        assert r["step"] == 1 and r["meta"] == {"i": 1}
        assert not [p for p in os.listdir(d) if "orbax-checkpoint-tmp" in p]  # junk cleaned
        assert _save(ckpt, 2, _small(2)) and ckpt.all_steps() == [1, 2]


def test_missing_directory_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointNotFoundError, match=f"{missing}.*does not exist"):
        Checkpointer(missing, read_only=True)
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointNotFoundError,
                           match=rf"{tmp_path / 'empty'} has no finished checkpoint.*run that saved"):
            _restore(ckpt, _small(0))


def test_structure_mismatch_errors(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, _small(1))
        s = _small(0)
        with pytest.raises(CheckpointMismatchError, match=r"'control'.*key 'extra' is in the target"):
            _restore(ckpt, {**s, "control": {**s["control"], "extra": jnp.zeros(())}})
        with pytest.raises(CheckpointMismatchError, match=r"'params'.*key 'w' .*in the checkpoint but not"):
            _restore(ckpt, {**s, "params": {"v": jnp.zeros(4)}})
        with pytest.raises(CheckpointMismatchError,
                           match=r"key 'w' has shape \(4,\) in the checkpoint but \(5,\)"):
            _restore(ckpt, {**s, "params": {"w": jnp.zeros(5)}})
        with pytest.raises(CheckpointMismatchError, match=r"key 'count' has dtype int32 .* float32"):
            _restore(ckpt, {**s, "opt_state": {"count": jnp.float32(0)}})


def _damage(item_dir, which):
    """Truncates the array data files under an orbax item directory (`data`) or its JSON
    `_METADATA` (`metadata`) to half their size; returns how many it truncated."""
    files = [os.path.join(root, f) for root, _, names in os.walk(item_dir) for f in names
             if (which == "data" and os.path.basename(root) == "d")
             or (which == "metadata" and f == "_METADATA")]
    for f in files:
        os.truncate(f, os.path.getsize(f) // 2)
    return len(files)


def test_damaged_latest_step_falls_back_to_the_newest_that_restores(tmp_path, caplog):
    with Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, _small(1))
        _save(ckpt, 2, _small(2))
        with pytest.raises(CheckpointMismatchError):  # a config change never falls back
            _restore(ckpt, {**_small(0), "params": {"w": jnp.zeros(5)}})
    assert _damage(tmp_path / "2" / "params", "data") > 0
    with Checkpointer(tmp_path) as ckpt:
        with caplog.at_level("WARNING", logger="uecjax.checkpoint"):
            r = _restore(ckpt, _small(0))
        assert r["step"] == 1 and r["meta"] == {"i": 1}
        assert_bit_exact({k: r[k] for k in ("params", "opt_state", "control")},
                         {k: _small(1)[k] for k in ("params", "opt_state", "control")})
        assert [s for s, _ in r["skipped"]] == [2]
        warnings = [rec.getMessage() for rec in caplog.records if rec.name == "uecjax.checkpoint"]
        assert len(warnings) == 1 and "\n" not in warnings[0]
        assert warnings[0].startswith(f"checkpoint step 2 in {tmp_path} does not restore, skipped: ")
        assert r["skipped"][0][1] in warnings[0]
        with pytest.raises(CheckpointUnreadableError, match=r"^step 2 of .* does not restore"):
            _restore(ckpt, _small(0), step=2)  # an explicit step never falls back
        assert _restore(ckpt, _small(0), step=1)["skipped"] == []
    assert _damage(tmp_path / "1" / "params", "metadata") > 0
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointUnreadableError) as info:
            _restore(ckpt, _small(0))
    message = str(info.value)
    assert isinstance(info.value, CheckpointNotFoundError) and "\n" not in message
    assert message.startswith(f"no step of {tmp_path} restores (2 tried, newest first)")
    assert "step 2: ValueError" in message and "step 1: JSONDecodeError" in message


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match=r"meta\.data\.pos is a ndarray"):
            ckpt.save(1, params={}, opt_state={}, control={}, meta={"data": {"pos": np.zeros(2)}})
        assert ckpt.all_steps() == []


def test_sigterm_sets_flag():
    clear_preemption()
    previous = signal.getsignal(signal.SIGTERM)
    seen = []
    restore = install_sigterm_handler(seen.append)
    try:
        assert not preemption_requested(0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not preemption_requested(0) and time.time() < deadline:
            time.sleep(0.01)
        assert preemption_requested(0)
        assert seen == [signal.SIGTERM]
    finally:
        restore()
        clear_preemption()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert not preemption_requested(0)
