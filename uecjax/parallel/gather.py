"""Host views of global arrays and small host data across processes. Collectives when an
array spans other hosts' devices or there are several processes: every process calls them,
in the same order. Depends on nothing of uecjax (the model loaders use it)."""

from __future__ import annotations

import pickle

import jax
import numpy as np
from jax.experimental import multihost_utils


def host_array(x) -> np.ndarray:
    """A jax Array (or numpy) as numpy holding the whole global value, on every process.

    Arrays on this process's devices, or replicated, are read directly; an array sharded over
    other hosts' devices is all-gathered (a collective: all processes call, in the same order).
    """
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
    """`host_array` over a pytree."""
    return jax.tree.map(host_array, tree)


def allgather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (a collective: all call).

    For small host data (prompts, iterator states): each process pickles its object into a
    uint8 buffer, the lengths are all-gathered, then the buffers padded to the next power of
    two of the longest (process_allgather compiles once per shape, not once per step).
    With one process: [obj], no collective.
    """
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
    sizes = sizes.reshape(-1)
    padded = np.zeros(1 << max(int(sizes.max()) - 1, 1).bit_length(), np.uint8)
    padded[: data.size] = data
    buffers = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(buffers[i, : int(n)].tobytes()) for i, n in enumerate(sizes)]
