"""The Qwen2 / Qwen2.5 decoder in flax.nnx.

One forward serves training (whole padded sequences) and decoding (a KV cache written at a
slot index). Layer weights are stacked on a leading `layers` axis and the layers run under
`lax.scan`, so compile time does not grow with depth; `config.remat` chooses what the
backward pass recomputes instead of keeping (`remat_policy`).

Weights are stored input-major (`x @ w`), the transpose of torch's `nn.Linear`; `hf.py` maps
them to and from the Hugging Face names.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from uecjax.models.attention import Mask, attention, causal_mask
from uecjax.models.config import TextConfig
from uecjax.models.lora import LoraSpec, adapter_axes, adapter_names, project
from uecjax.models.rope import apply_rope, inverse_frequencies, rope_tables


def linear_axes(name: str, in_axis: str, out_axis: str, *, bias: bool = True,
                stacked: bool = True) -> dict[str, tuple[str, ...]]:
    """The logical axes of a linear layer: its weight `{name}_w` [in, out] and, with `bias`,
    its bias `{name}_b` [out], behind the leading "layers" axis where `stacked`."""
    lead = ("layers",) if stacked else ()
    axes = {f"{name}_w": (*lead, in_axis, out_axis)}
    if bias:
        axes[f"{name}_b"] = (*lead, out_axis)
    return axes


# Logical axes of every parameter; uecjax.parallel.mesh maps them to mesh axes. One source of
# truth for parameter, optimizer-state and checkpoint placement.
MODEL_PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("norm",),
    "lm_head": ("embed", "vocab"),
}
LAYER_PARAM_AXES = {
    "input_norm": ("layers", "norm"),
    **linear_axes("q", "embed", "q_heads"),
    **linear_axes("k", "embed", "kv_heads"),
    **linear_axes("v", "embed", "kv_heads"),
    **linear_axes("o", "q_heads", "embed", bias=False),
    "post_norm": ("layers", "norm"),
    **linear_axes("gate", "embed", "mlp", bias=False),
    **linear_axes("up", "embed", "mlp", bias=False),
    **linear_axes("down", "mlp", "embed", bias=False),
}
# LoRA adapters (uecjax.models.lora), where a model has them: A [layers, in, r], B [layers, r, out].
for _name in ("q", "k", "v", "o", "gate", "up", "down"):
    LAYER_PARAM_AXES.update(zip(adapter_names(_name), adapter_axes(*LAYER_PARAM_AXES[f"{_name}_w"][1:])))

class KVCache(NamedTuple):
    """Keys and values of every layer: [layers, batch, kv_heads, slots, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def num_slots(self) -> int:
        return self.k.shape[3]


def rms_norm(x, weight, eps):
    """RMSNorm in float32, cast back before the weight, as transformers' Qwen2RMSNorm."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading axis of size num_hidden_layers."""

    def __init__(self, cfg: TextConfig, rngs: nnx.Rngs):
        L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        shapes = {
            "input_norm": (L, H), "q_w": (L, H, q), "q_b": (L, q), "k_w": (L, H, kv),
            "k_b": (L, kv), "v_w": (L, H, kv), "v_b": (L, kv), "o_w": (L, q, H),
            "post_norm": (L, H), "gate_w": (L, H, I), "up_w": (L, H, I), "down_w": (L, I, H),
        }
        for name, shape in shapes.items():
            setattr(self, name, nnx.Param(_init(name, shape, cfg.weight_dtype, rngs)))
        self.lora: LoraSpec | None = None  # set by uecjax.models.lora.add_lora

    def arrays(self) -> dict[str, jax.Array]:
        """Every layer array, the LoRA adapters included where the model has them."""
        return {name: getattr(self, name)[...] for name in LAYER_PARAM_AXES if hasattr(self, name)}


def _init(name, shape, dtype, rngs):
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    if name.endswith("_b"):
        return jnp.zeros(shape, dtype)
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _decoder_layer(cfg: TextConfig, p, x, cos, sin, mask: Mask, cache, layer, cache_index,
                   lora: LoraSpec | None = None, dropout_key=None):
    """One pre-norm decoder layer; returns (x, cache).

    cache: None, (k, v) of all layers stacked (then `layer` indexes them), or (k, v) of this
    layer alone (layer=None). The T new keys/values are written at slot `cache_index`.
    lora: the adapters' spec (their arrays are in p); dropout_key: this layer's LoRA dropout.
    """
    B, T, _ = x.shape
    dt = cfg.compute_dtype
    nh, kvh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    keys = dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"))
    if dropout_key is not None:
        keys = {name: jax.random.fold_in(dropout_key, i) for i, name in enumerate(keys)}
    proj = lambda h, name: project(h, p, name, dt, lora, keys[name])  # noqa: E731

    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q = (proj(h, "q") + p["q_b"].astype(dt)).reshape(B, T, nh, hd)
    k = (proj(h, "k") + p["k_b"].astype(dt)).reshape(B, T, kvh, hd)
    v = (proj(h, "v") + p["v_b"].astype(dt)).reshape(B, T, kvh, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # Attention runs KV-head-major ([B, kv_heads, ...]) so both matmuls batch over leading
    # axes with no transposes in between; the cache is stored that way too.
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kvh, T, hd]
    if cache is not None:
        cache_k, cache_v = cache
        if layer is None:
            cache_k = _write_cache(cache_k, k, cache_index)
            cache_v = _write_cache(cache_v, v, cache_index)
            k, v = cache_k.astype(dt), cache_v.astype(dt)
        else:
            if jnp.ndim(cache_index):
                raise ValueError("per-row cache indices need the unrolled layers (layers=)")
            start = (layer, 0, 0, cache_index, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
            k, v = cache_k[layer].astype(dt), cache_v[layer].astype(dt)
        cache = (cache_k, cache_v)

    attn = attention(q, k, v, mask, cfg.attention).reshape(B, T, nh * hd)
    x = x + proj(attn, "o")

    h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    gate = jax.nn.silu(proj(h, "gate"))
    x = x + proj(gate * proj(h, "up"), "down")
    return x, cache


def _write_cache(cache, new, cache_index):
    """Writes new [B, kv_heads, T, hd] into one layer's cache at slot cache_index: a scalar
    (every row at the same slot) or [B] (each row at its own, continuous batching)."""
    new = new.astype(cache.dtype)
    if not jnp.ndim(cache_index):
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, cache_index, 0))
    write = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0))  # noqa: E731
    return jax.vmap(write)(cache, new, cache_index)


def remat_policy(mode: str):
    """(use jax.checkpoint around each layer, its saving policy) for config.remat.

    none       nothing is recomputed: every layer's activations (projections, attention
               scores and probabilities, MLP) stay alive from the forward to the backward.
    per_layer  each layer runs under jax.checkpoint keeping the outputs of its weight matmuls
               (q/k/v/o, gate/up/down projections: dot products without batch dimensions,
               `dots_with_no_batch_dims_saveable`); the backward recomputes the norms, RoPE,
               the attention scores / softmax (the [T, T] part) and the activations.
    full       each layer runs under jax.checkpoint keeping nothing but its input
               (`nothing_saveable`): the backward recomputes the whole layer, one layer at a
               time, so the activations held across the model are one [B, T, hidden] per layer.
    In every mode the lm-head's logits are recomputed in the backward (the chunked log-prob
    custom VJP, uecjax.objectives.logprobs), and passes that are not differentiated (sampling,
    old / reference log-probs) keep no activations at all.
    """
    policies = jax.checkpoint_policies
    return {"none": (False, None),
            "per_layer": (True, policies.dots_with_no_batch_dims_saveable),
            "full": (True, policies.nothing_saveable)}[mode]


class Qwen2(nnx.Module):
    """Qwen2 causal LM. `model(input_ids)` gives float32 logits [B, T, V]."""

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
        self.config = config
        V, H = config.vocab_size, config.hidden_size
        self.embed = nnx.Param(_init("embed", (V, H), config.weight_dtype, rngs))
        self.layers = DecoderLayers(config, rngs)
        self.final_norm = nnx.Param(jnp.ones((H,), config.weight_dtype))
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(
            _init("lm_head", (H, V), config.weight_dtype, rngs))
        inv_freq, self.rope_attention_factor = inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_dict(), config.max_position_embeddings)
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)  # static, not a parameter

    # -- pieces ---------------------------------------------------------------------------
    def embed_tokens(self, input_ids):
        return self.embed[...][input_ids].astype(self.config.compute_dtype)

    def output_weight(self):
        """The [hidden, vocab] matrix that maps final hidden states to logits."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def rope(self, positions):
        """cos, sin [B, T, head_dim] for integer positions [B, T]."""
        return rope_tables(positions, jnp.asarray(self.rope_inv_freq, jnp.float32),
                           self.rope_attention_factor)

    def init_cache(self, batch: int, num_slots: int, dtype=None) -> KVCache:
        cfg = self.config
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, num_slots, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def logits(self, hidden):
        """float32 logits from final hidden states (the full [.., V]: use for short T only)."""
        w = self.output_weight().astype(self.config.compute_dtype)
        return jnp.einsum("bth,hv->btv", hidden, w, preferred_element_type=jnp.float32)

    # -- forward --------------------------------------------------------------------------
    def layer_list(self) -> list[dict[str, jax.Array]]:
        """Each layer's weights as separate arrays (for `hidden_states(layers=...)`)."""
        stacked = self.layers.arrays()
        return [{k: w[i] for k, w in stacked.items()} for i in range(self.config.num_hidden_layers)]

    def hidden_states(self, x, positions, key_mask, *, cache: KVCache | None = None,
                      cache_index=0, rope=None, layers=None, segment_ids=None, dropout_key=None):
        """Runs the decoder stack on embeddings x [B, T, H]; returns (final-normed hidden, cache).

        key_mask [B, S] is True on keys that may be attended (S = T without a cache, else the
        cache's slot count). Without a cache, query t sees keys s <= t; with one, the T new
        keys are written at slots [cache_index, cache_index + T) and query t sees slots
        s <= cache_index + t; cache_index is a scalar or, with `layers`, one per row [B]. rope: precomputed (cos, sin), e.g. M-RoPE for vision inputs.
        segment_ids [B, T] (no cache): packed sequences, each attending only within itself.

        layers: `layer_list()` to run the layers unrolled, with a cache whose k and v are
        tuples of per-layer arrays. The decode loop uses it: under `lax.scan` every step
        would slice (copy) each layer's weights and cache out of the stacked arrays, which
        cost about a third of a CPU decode step; unrolled, they are read in place.
        dropout_key: LoRA dropout on (the differentiated pass of training); None: none.
        """
        cfg = self.config
        B, T, _ = x.shape
        cos, sin = rope if rope is not None else self.rope(positions)
        mask = causal_mask(key_mask, cache_index, T, segment_ids)
        lora = self.layers.lora
        layer_key = lambda i: None if dropout_key is None else jax.random.fold_in(dropout_key, i)  # noqa: E731

        if layers is not None:
            ks, vs = [], []
            for i, p in enumerate(layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = _decoder_layer(cfg, p, x, cos, sin, mask, kv, None, cache_index, lora,
                                       layer_key(i))
                if kv is not None:
                    ks.append(kv[0])
                    vs.append(kv[1])
            x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
            return x, (None if cache is None else KVCache(tuple(ks), tuple(vs)))

        def body(carry, layer_in):
            x, kv = carry
            p, layer = layer_in
            x, kv = _decoder_layer(cfg, p, x, cos, sin, mask, kv, layer, cache_index, lora,
                                   layer_key(layer))
            return (x, kv), None

        use_remat, policy = remat_policy(cfg.remat)
        if use_remat:  # prevent_cse=False: scan already keeps the recomputation apart
            body = jax.checkpoint(body, prevent_cse=False, policy=policy)
        kv = None if cache is None else (cache.k, cache.v)
        xs = (self.layers.arrays(), jnp.arange(cfg.num_hidden_layers))
        (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        return x, (None if kv is None else KVCache(*kv))

    def __call__(self, input_ids, attention_mask=None, positions=None):
        """Logits [B, T, V] float32 for int32 tokens [B, T] (training / scoring, no cache).

        attention_mask [B, T]: 1 on real tokens, 0 on padding (default: all real).
        positions [B, T]: default counts real tokens from 0, which left padding needs.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        hidden, _ = self.hidden_states(self.embed_tokens(input_ids), positions, attention_mask)
        return self.logits(hidden)


def default_positions(attention_mask):
    """Position ids that count real tokens: 0, 1, ... from the first real token (left padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
