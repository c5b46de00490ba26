"""Training checkpoints with orbax: params, optimizer and controller state, buffers, meta.

    ckpt = Checkpointer(workdir + "/checkpoints", max_to_keep=3)
    ckpt.save(step, params=params, opt_state=opt_state, control=control, meta=meta, force=stop)
    r = ckpt.restore(params_target=abstract_like(params), opt_state_target=abstract_like(opt),
                     control_target=abstract_like(control))     # the newest step that restores

One directory `<directory>/<step>/` per saved step, one orbax item each (params, opt_state,
control, buffers, meta and format JSON), committed atomically; old steps are deleted only
after a new one commits. `install_sigterm_handler` and `preemption_requested(step)` turn
SIGTERM into a request the loop polls (several processes: JAX's preemption service agrees on
one step). The run's own state on top of this is `uecjax.run_state`. Layout, atomicity and
preemption: docs/DESIGN.md, "Checkpoints and preemption".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

__all__ = ["CheckpointMismatchError", "CheckpointNotFoundError", "CheckpointUnreadableError",
           "Checkpointer", "abstract_like", "clear_preemption", "install_sigterm_handler",
           "preemption_requested"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_ARRAY_ITEMS = ("params", "opt_state", "control", "buffers")
_JSON_ITEMS = ("meta", "format")


class CheckpointNotFoundError(FileNotFoundError):
    """No (finished) checkpoint where one was asked for."""


class CheckpointUnreadableError(CheckpointNotFoundError):
    """Checkpoints exist but none of the steps tried restores (damaged or truncated files)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's contents do not match the restore targets (tree structure, shape, dtype)."""


# ----------------------------------------------------------------------------- pytree helpers

def _path_str(path) -> str:
    """A key path as 'a/b/0/c': the same for a target tree and orbax's stored (dict) tree."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _abstract_leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # no sharding: restored as numpy
    return x


def abstract_like(tree):
    """Concrete arrays -> `jax.ShapeDtypeStruct`s with the same shape, dtype and sharding.

    jax Arrays keep their sharding (restore places them there); numpy arrays get none (restored
    as numpy); typed PRNG keys keep their key dtype. Use it to build restore targets from a freshly
    initialized state (or `nnx.eval_shape` + shardings for one that never materializes).
    """
    return jax.tree.map(_abstract_leaf, tree)


def _encode(tree, name: str):
    """The tree orbax saves, plus what orbax cannot store natively (typed keys, zero-size arrays)."""
    info: dict[str, dict] = {"keys": {}, "empty": {}}

    def enc(path, x):
        p = _path_str(path)
        if _is_key(x):
            info["keys"][p] = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            if x.size == 0:  # orbax refuses zero-size arrays; store a placeholder
                info["empty"][p] = {"shape": list(x.shape), "dtype": jax.numpy.dtype(x.dtype).name}
                return np.zeros((1,), x.dtype)
        elif not isinstance(x, (int, float, bool)):
            raise TypeError(f"checkpoint item {name!r}: leaf {p!r} is a {type(x).__name__}; "
                            "only jax/numpy arrays and Python scalars can be saved")
        return x

    return jax.tree_util.tree_map_with_path(enc, tree), info


def _key_data_sharding(sharding, ndim_extra: int):
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(*sharding.spec, *([None] * ndim_extra))
        return jax.sharding.NamedSharding(sharding.mesh, spec)
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


def _target_leaf(x, default_sharding=None):
    """A restore target leaf in the form orbax is given it (keys as key data, no zero sizes).

    A ShapeDtypeStruct without sharding gets `default_sharding` (params/opt_state/control: the
    first local device, so they come back as jax Arrays); with None it comes back as numpy.
    """
    x = _abstract_leaf(x)
    if not isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = x.sharding if x.sharding is not None else default_sharding
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, x)
        if sharding is not None:
            sharding = _key_data_sharding(sharding, data.ndim - x.ndim)
        x = jax.ShapeDtypeStruct(data.shape, data.dtype)
    if int(np.prod(x.shape)) == 0:  # the saved placeholder; rebuilt with the target's sharding
        return jax.ShapeDtypeStruct((1,), x.dtype, sharding=default_sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _json_ready(obj, path="meta"):
    """Numpy scalars -> Python; anything else that JSON cannot hold is an error naming the key."""
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{path}: key {k!r} is a {type(k).__name__}; JSON keys must be str")
            out[k] = _json_ready(v, f"{path}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"{path} is a {type(obj).__name__}, which JSON cannot hold; convert it (arrays "
                    "belong in `control` or `buffers`, not `meta`)")


# ----------------------------------------------------------------------------- the checkpointer

class Checkpointer:
    """Keeps the newest `max_to_keep` checkpoints of a training run under `directory`.

    Args:
      directory: local path or gs:// URL; created unless `read_only`.
      max_to_keep: newest steps kept (None keeps all); older ones are deleted after a new one
        commits.
      save_interval_steps: `save(step)` writes when `step % save_interval_steps == 0` (or with
        `force=True`, or at a multi-host preemption sync step).
      async_save: if True `save` returns once the arrays are copied off the devices (so they may
        be donated) and the files are written in a background thread; `wait()` blocks on it.
      read_only: never writes or deletes (evaluation); the directory must exist.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = False, read_only: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all), got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        directory = str(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        if read_only and not self.directory.exists():
            raise CheckpointNotFoundError(
                f"checkpoint directory {self.directory} does not exist: pass the checkpoint "
                "directory of a training run (<workdir>/checkpoints)")
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(save_interval_steps),
                policies.PreemptionCheckpointingPolicy()]),
            preservation_policy=policies.LatestN(n=max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in _ARRAY_ITEMS:
            registry.add(item, ocp.args.StandardSave)
            registry.add(item, ocp.args.StandardRestore)
        for item in _JSON_ITEMS:
            registry.add(item, ocp.args.JsonSave)
            registry.add(item, ocp.args.JsonRestore)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)

    # -- steps

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (unfinished tmp directories are never listed)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # -- save

    def save(self, step: int, *, params, opt_state, control, meta: Mapping[str, Any],
             buffers=None, force: bool = False) -> bool:
        """Saves a step if the interval (or `force`, or a preemption sync point) says so.

        Returns whether a checkpoint was written (or, with `async_save`, started). A step that
        already exists is never overwritten (returns False). Call on every process.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if not force and not self._manager.should_save(step):
            return False
        items = {"params": params, "opt_state": opt_state, "control": control}
        if buffers is not None:
            items["buffers"] = buffers
        fmt = {"format_version": FORMAT_VERSION, "step": step, "items": {}}
        args = {}
        for name, tree in items.items():
            encoded, info = _encode(tree, name)
            fmt["items"][name] = info
            args[name] = ocp.args.StandardSave(encoded)
        if not isinstance(meta, Mapping):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        args["meta"] = ocp.args.JsonSave(_json_ready(meta))
        args["format"] = ocp.args.JsonSave(fmt)
        return self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    # -- restore

    def _missing(self, what: str) -> CheckpointNotFoundError:
        if not self.directory.exists():
            state = "does not exist"
        else:
            state = "has no finished checkpoint"
            if any(ocp.path.step.TMP_DIR_SUFFIX in p.name for p in self.directory.iterdir()):
                state += " (only unfinished tmp directories of interrupted saves)"
        return CheckpointNotFoundError(
            f"{what}: checkpoint directory {self.directory} {state}. Point it at the checkpoint "
            "directory of a run that saved (<workdir>/checkpoints), or start without resuming.")

    def _check(self, step: int, name: str, stored, target, info: Mapping) -> None:
        """Same keys, shapes and dtypes in the checkpoint's metadata and in the target."""
        def stored_leaf(p, m):
            if p in info["empty"]:
                e = info["empty"][p]
                return tuple(e["shape"]), jax.numpy.dtype(e["dtype"])
            return getattr(m, "shape", None), getattr(m, "dtype", None)

        def target_leaf(x):
            x = _abstract_leaf(x)
            if _is_key(x):
                x = jax.eval_shape(jax.random.key_data, x)
            return getattr(x, "shape", None), getattr(x, "dtype", None)

        flat = jax.tree_util.tree_flatten_with_path
        stored_leaves = {(p := _path_str(k)): stored_leaf(p, m) for k, m in flat(stored)[0]}
        target_leaves = {_path_str(k): target_leaf(x) for k, x in flat(target)[0]}
        where = f"checkpoint {self.directory / str(step)}, item {name!r}"
        missing = sorted(set(target_leaves) - set(stored_leaves))
        extra = sorted(set(stored_leaves) - set(target_leaves))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"key {missing[0]!r} is in the target but not in the checkpoint"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            if extra:
                parts.append(f"key {extra[0]!r} is in the checkpoint but not in the target"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
            raise CheckpointMismatchError(
                f"{where}: tree structure differs: {'; '.join(parts)}. The model/optimizer config "
                "must match the run that saved the checkpoint.")
        for p, (t_shape, t_dtype) in target_leaves.items():
            s_shape, s_dtype = stored_leaves[p]
            if s_shape is not None and t_shape is not None and tuple(s_shape) != tuple(t_shape):
                raise CheckpointMismatchError(
                    f"{where}: key {p!r} has shape {tuple(s_shape)} in the checkpoint but "
                    f"{tuple(t_shape)} in the target")
            if s_dtype is not None and t_dtype is not None and np.dtype(s_dtype) != np.dtype(t_dtype):
                raise CheckpointMismatchError(
                    f"{where}: key {p!r} has dtype {np.dtype(s_dtype)} in the checkpoint but "
                    f"{np.dtype(t_dtype)} in the target")

    def restore(self, step: int | None = None, *, params_target, opt_state_target, control_target,
                buffers_target=None) -> dict[str, Any]:
        """Restores a step (default: the latest) onto the targets' structure, dtypes and shardings.

        Targets are concrete or abstract (`abstract_like`, `jax.ShapeDtypeStruct` with sharding)
        pytrees; their structure, shapes and dtypes must match the checkpoint
        (`CheckpointMismatchError` names the first key that does not). A jax target leaf is
        placed on its sharding; a ShapeDtypeStruct without one lands on the first local device
        (in `buffers_target`: comes back as numpy); a numpy target leaf comes back as numpy.
        `buffers_target=None` returns the saved buffers as numpy arrays in the structure they
        were saved with (None if the step has none). Typed PRNG key targets get typed keys back
        (saved as `jax.random.key_data`, rewrapped), raw uint32 targets raw key data.

        Without `step`, a latest step that does not restore (damaged files: a truncated or
        overwritten array file, broken JSON) is skipped with one warning each, newest first,
        down to the newest one that restores; `CheckpointUnreadableError` lists the steps tried
        when none does. An explicit `step` that does not restore raises it at once.
        `CheckpointMismatchError` (a config change, not damage) always raises.

        Returns {"step", "params", "opt_state", "control", "buffers", "meta", "skipped"};
        skipped: [(step, reason)] of the newer steps that did not restore.
        """
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise self._missing("restore")
            candidates = steps[::-1]
        elif step not in steps:
            if not steps:
                raise self._missing(f"restore of step {step}")
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        else:
            candidates = [int(step)]
        skipped: list[tuple[int, str]] = []
        for candidate in candidates:
            try:
                out, error = self._restore_step(candidate, params_target, opt_state_target,
                                                control_target, buffers_target), None
            except CheckpointMismatchError:
                raise
            except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many kinds on damage)
                out, error = None, e
            if jax.process_count() > 1:
                # Every process must resume from the same step: one failed read fails it for all.
                failed = multihost_utils.process_allgather(np.int32(error is not None))
                if error is None and np.any(failed):
                    error = RuntimeError("another process could not read it")
            if error is None:
                out["skipped"] = skipped
                return out
            reason = _one_line(error)
            skipped.append((candidate, reason))
            if step is None and candidate != candidates[-1]:
                log.warning("checkpoint step %d in %s does not restore, skipped: %s", candidate,
                            self.directory, reason)
        tried = "; ".join(f"step {s}: {r}" for s, r in skipped)
        what = f"step {step} of {self.directory} does not restore" if step is not None else \
            f"no step of {self.directory} restores ({len(skipped)} tried, newest first)"
        raise CheckpointUnreadableError(
            f"{what}, the files look damaged: {tried}. Move the damaged step directories "
            "away (or the whole directory, to start the run over).")

    def _restore_step(self, step: int, params_target, opt_state_target, control_target,
                      buffers_target) -> dict[str, Any]:
        fmt = self._manager.restore(step, args=ocp.args.Composite(format=ocp.args.JsonRestore()))["format"]
        stored_md = self._manager.item_metadata(step)
        targets = {"params": params_target, "opt_state": opt_state_target, "control": control_target}
        if buffers_target is not None:
            if "buffers" not in fmt["items"]:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory / str(step)} has no buffers but a buffers_target "
                    "was given")
            targets["buffers"] = buffers_target
        args = {"meta": ocp.args.JsonRestore()}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        for name, target in targets.items():
            default = None if name == "buffers" else device
            enc = jax.tree.map(lambda x: _target_leaf(x, default), target)  # noqa: B023
            self._check(step, name, stored_md[name], target, fmt["items"][name])
            args[name] = ocp.args.StandardRestore(enc)
        if buffers_target is None and "buffers" in fmt["items"]:
            args["buffers"] = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))

        out: dict[str, Any] = {"step": step, "meta": restored["meta"], "buffers": None}
        for name, target in targets.items():
            out[name] = _decode(restored[name], target, fmt["items"][name])
        if buffers_target is None and "buffers" in fmt["items"]:
            out["buffers"] = _decode_untargeted(restored["buffers"], fmt["items"]["buffers"])
        return out

    # -- lifecycle

    def wait(self) -> None:
        """Blocks until an async save has been committed (and old steps deleted)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(error: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut to `limit` characters (tensorstore's run long)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _decode(restored, target, info):
    """Back from orbax's form to the target's: wraps key data, rebuilds zero-size arrays."""
    def dec(path, t, r):
        p = _path_str(path)
        t = _abstract_leaf(t)
        if not isinstance(t, jax.ShapeDtypeStruct):
            return r
        if int(np.prod(t.shape)) == 0 and not _is_key(t):
            empty = np.empty(t.shape, t.dtype)
            if isinstance(r, jax.Array) or t.sharding is not None:
                return jax.device_put(empty, t.sharding if t.sharding is not None else r.sharding)
            return empty
        if _is_key(t):
            impl = info["keys"].get(p) or _impl_of(t)
            key = jax.random.wrap_key_data(r, impl=impl)
            if key.dtype != t.dtype:
                raise CheckpointMismatchError(
                    f"key {p!r}: the checkpoint holds a {key.dtype} PRNG key, the target a {t.dtype}")
            if t.sharding is not None and key.sharding != t.sharding:
                key = jax.device_put(key, t.sharding)
            return key
        return r

    return jax.tree_util.tree_map_with_path(dec, target, restored)


def _decode_untargeted(restored, info):
    def dec(path, r):
        p = _path_str(path)
        if p in info["empty"]:
            e = info["empty"][p]
            return np.empty(tuple(e["shape"]), jax.numpy.dtype(e["dtype"]))
        if p in info["keys"]:
            return jax.random.wrap_key_data(r, impl=info["keys"][p])
        return r

    return jax.tree_util.tree_map_with_path(dec, restored)


def _impl_of(sds: jax.ShapeDtypeStruct):
    impl = getattr(sds.dtype, "_impl", None)  # the key dtype's implementation (no public accessor)
    return impl if impl is not None else jax.config.jax_default_prng_impl


# ----------------------------------------------------------------------------- preemption

_preempted = threading.Event()


def install_sigterm_handler(callback: Callable[[int], None] | None = None, *,
                            signum: int = signal.SIGTERM) -> Callable[[], None]:
    """On SIGTERM, set the flag `preemption_requested()` reads (and call `callback(signum)`).

    The handler only records the request; the training loop saves at its next step boundary and
    exits. Returns a function that puts the previous handler back. Call from the main thread.
    In a multi-process job (after `jax.distributed.initialize()`) this installs nothing: JAX's
    preemption service owns SIGTERM there and `preemption_requested(step)` asks it instead.
    """
    if jax.process_count() > 1:
        log.info("multi-process job: SIGTERM is left to JAX's preemption service; poll "
                 "preemption_requested(step) every step")
        return lambda: None
    previous = signal.getsignal(signum)

    def handler(sig, frame):
        _preempted.set()
        if callback is not None:
            callback(sig)

    signal.signal(signum, handler)

    def restore():
        signal.signal(signum, previous)

    return restore


def preemption_requested(step: int | None = None) -> bool:
    """Whether the loop should save now and exit.

    Single process: True once SIGTERM has arrived (see `install_sigterm_handler`). Several
    processes: True on every host at the same step, the sync step JAX's preemption service picked
    (`multihost_utils.reached_preemption_sync_point`), so `step` is required there and the call
    must be made at every step on every host.
    """
    if jax.process_count() == 1:
        return _preempted.is_set()
    if step is None:
        raise ValueError("preemption_requested(step) needs the step in a multi-process job")
    try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    except RuntimeError:  # preemption service disabled (jax_enable_preemption_service=False)
        return False


def clear_preemption() -> None:
    """Forget a received SIGTERM (tests, or a loop that handled it and goes on)."""
    _preempted.clear()
