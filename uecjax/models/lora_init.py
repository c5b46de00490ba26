"""Adding LoRA adapters to a model: the draw (as PEFT draws it) and the placement on a mesh.

Apart from `uecjax.models.lora` because it needs the decoder's partition rules
(`qwen2.LAYER_PARAM_AXES`, `parallel.mesh`), which import that module for the forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uecjax.models.lora import LoraError, LoraSpec, adapter_names, decoder_layers
from uecjax.models.qwen2 import LAYER_PARAM_AXES
from uecjax.parallel.mesh import partition_spec


def add_lora(model, spec: LoraSpec, *, seed: int = 0, mesh=None):
    """Adds rank-r adapters to `spec.targets` in place and returns the model.

    A is drawn as PEFT draws it (kaiming-uniform, bound 1 / sqrt(fan_in)) and B is zero, so
    the first forward equals the base model's exactly. Adapters are float32 whatever the base
    weights' dtype (they are the trained parameters). With `mesh` they are placed by the
    models' partition rules; the model may be abstract (`nnx.eval_shape`) without one.
    """
    layers = decoder_layers(model)
    if layers.lora is not None:
        raise LoraError(f"the model has LoRA adapters already ({layers.lora})")
    key = jax.random.key(seed)
    for i, target in enumerate(spec.targets):
        L, fan_in, fan_out = getattr(layers, f"{target}_w").shape
        name_a, name_b = adapter_names(target)
        bound = 1.0 / np.sqrt(fan_in)

        def make_a(k=jax.random.fold_in(key, i), shape=(L, fan_in, spec.rank), bound=bound):
            return jax.random.uniform(k, shape, jnp.float32, -bound, bound)

        def make_b(shape=(L, spec.rank, fan_out)):
            return jnp.zeros(shape, jnp.float32)

        for name, make in ((name_a, make_a), (name_b, make_b)):
            if mesh is not None:
                shape = jax.eval_shape(make).shape
                sharding = jax.sharding.NamedSharding(
                    mesh, partition_spec(LAYER_PARAM_AXES[name], shape, mesh)[0])
                make = jax.jit(make, out_shardings=sharding)
            setattr(layers, name, nnx.LoRAParam(make()))
    layers.lora = spec
    return model
