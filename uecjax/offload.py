"""Parameters parked in host memory between uses (the reference model of a KL penalty).

    ref = HostParams(params, shardings, offload=True)           # a copy, in host memory
    logp = trainer.compute_logprobs(ref.on_device(), batch)   # copied in, used, dropped

With `offload=True` the arrays are moved to the "pinned_host" memory of their devices (same
sharding, `memory_kind="pinned_host"`), so they stop taking accelerator memory; `on_device()`
copies them back for one pass and the copy is freed when the caller drops it. That costs one
host-to-device transfer of the parameters per use (about 0.6 s for 7B float32 parameters at
25 GB/s). Backends without pinned host memory keep the parameters on the device with a logged
warning. CPU devices already live in host memory, so there it does nothing (and says so);
`allow_cpu=True` moves them anyway (tests of the mechanism).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

HOST_MEMORY = "pinned_host"


def host_memory_supported(shardings) -> bool:
    """Whether every device of these shardings has pinned host memory."""
    devices = {d for s in jax.tree.leaves(shardings) for d in s.device_set}
    return all(HOST_MEMORY in {m.kind for m in d.addressable_memories()}
               for d in devices if d.process_index == jax.process_index())


class HostParams:
    """A copy of a parameter tree, kept in pinned host memory (or on device where that is not
    possible). The copy is the caller's to keep: the train step may donate the originals."""

    def __init__(self, params, shardings, *, offload: bool, allow_cpu: bool = False):
        self.shardings = shardings
        self.offloaded = False
        copy = True
        if offload:
            platform = next(iter(jax.tree.leaves(shardings)[0].device_set)).platform
            if platform == "cpu" and not allow_cpu:
                log.info("offload of the reference parameters: CPU devices use host memory "
                         "already; nothing to do")
            elif not host_memory_supported(shardings):
                log.warning("offload of the reference parameters: the %s devices have no %r "
                            "memory; keeping them on the device", platform, HOST_MEMORY)
            else:
                host = jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), shardings)
                params = jax.device_put(params, host)  # a new buffer in host memory
                self.offloaded, copy = True, False
        self.params = jax.tree.map(jnp.copy, params) if copy else params

    def on_device(self):
        """The parameters in device memory, for one use (a fresh copy when offloaded)."""
        if not self.offloaded:
            return self.params
        return jax.device_put(self.params, self.shardings)
