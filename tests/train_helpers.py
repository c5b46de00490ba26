"""Shared pieces of the train-step tests: a tiny model, random batches, naive references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uecjax.batch import Batch, positions_from_mask
from uecjax.models import Qwen2, TextConfig
from uecjax.objectives import group_advantages
from uecjax.optim import OptimConfig
from uecjax.parallel.mesh import make_mesh

TINY = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
P, R = 3, 5  # prompt and response widths
# Adam with a large eps is close to SGD (update ~ lr * g): parameters after one step then
# reflect gradient differences instead of Adam's first-step sign(g).
SGD_LIKE = OptimConfig(learning_rate=0.1, eps=1.0, weight_decay=0.01, max_grad_norm=0.0)


def tiny_model(seed: int = 0, scale: float = 10.0) -> Qwen2:
    """The tiny Qwen2 with a sharper lm-head (entropy well below log V, gradients not tiny)."""
    model = Qwen2(TINY, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * scale
    return model


def single_mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def random_batch(B: int = 8, G: int = 4, seed: int = 0, success_rate=None) -> Batch:
    """Left-padded prompts, right-padded responses (one empty), group advantages; no log-probs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, (B, P + R)).astype(np.int32)
    prompt_len = rng.integers(1, P + 1, B)
    resp_len = rng.integers(2, R + 1, B)
    resp_len[0], resp_len[1] = 0, R  # an empty response and a full one
    mask = np.zeros((B, P + R), np.int32)
    for i in range(B):
        mask[i, P - prompt_len[i]:P + resp_len[i]] = 1
    tokens = np.where(mask > 0, tokens, 0)
    rewards = rng.integers(0, 2, B).astype(np.float32)
    if success_rate is None:
        success_rate = np.repeat(rng.choice([0.0, 0.25, 0.5, 1.0], B // G), G).astype(np.float32)
    return Batch(tokens=tokens, attention_mask=mask, positions=positions_from_mask(mask),
                 response_mask=mask[:, P:].astype(np.float32),
                 advantages=np.asarray(group_advantages(rewards, G)),
                 success_rate=np.asarray(success_rate, np.float32),
                 is_hard=(np.asarray(success_rate) <= 0.0).astype(np.float32))


def naive_logp_entropy(model_or_params, batch: Batch, graphdef=None):
    """Log-probs and entropies of the response tokens from the model's full logits [B, T, V]."""
    model = model_or_params if graphdef is None else nnx.merge(graphdef, model_or_params)
    logits = model(jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask), jnp.asarray(batch.positions))
    logp_all = jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1)
    logp = jnp.take_along_axis(logp_all, jnp.asarray(batch.tokens[:, P:])[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def with_logprobs(trainer, params, batch: Batch, ref_params=None, noise: float = 0.0, seed: int = 1) -> Batch:
    """Fills old (and reference) log-probs with `trainer.compute_logprobs`; noise > 0 takes the
    old policy from perturbed parameters, so that pi != pi_old (ratios, clipping)."""
    old = perturbed(params, noise, seed) if noise else params
    logp, entropy = trainer.compute_logprobs(old, batch)
    out = batch.replace(old_logp=np.asarray(logp), old_entropy=np.asarray(entropy),
                        sampler_logp=np.asarray(logp) + 0.01 * batch.response_mask)
    if ref_params is not None:
        out = out.replace(ref_logp=np.asarray(trainer.compute_logprobs(ref_params, batch)[0]))
    return out


def perturbed(params, noise: float, seed: int):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def random_lora_b(model, seed: int = 5, std: float = 0.05):
    """Nonzero LoRA B matrices (trained-looking adapters), in place; returns the model."""
    from uecjax.models.lora import adapter_names, decoder_layers

    layers = decoder_layers(model)
    for i, target in enumerate(layers.lora.targets):
        b = getattr(layers, adapter_names(target)[1])
        b[...] = (std * jax.random.normal(jax.random.key(seed + i), b.shape, jnp.float32)).astype(b.dtype)
    return model
