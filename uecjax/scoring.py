"""Scoring responses: per-token log-probs and entropies on the response window, micro-batched
(ALGORITHMS.md sections 1 and 3). Shared by the train step and the old/reference log-prob pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from uecjax.batch import Batch
from uecjax.objectives.logprobs import token_logprobs_and_entropy
from uecjax.packing import Packing


def response_logprobs(graphdef, params, tokens, attention_mask, positions, response_len: int,
                      chunk_size: int = 1024, images=None, packing: Packing | None = None,
                      dropout_key=None):
    """(log pi(response token), entropy), each [B, R] float32, temperature 1 (section 3).

    tokens [B, P + R]; positions [B, P + R], or [B, 3, P + R] (M-RoPE); images None, or
    (pixel_values, layouts) per row for `Qwen2_5_VL.embed_rows`. The last token is never an
    input (nothing follows it), and only the hidden states at positions P - 1 .. P + R - 2,
    which predict the response, reach the chunked, rematerialised lm-head: neither the
    prompt's logits nor the [B, T, V] logits of the batch ever exist. packing: the decoder
    runs on the packed rows (`uecjax.packing`); the result is the same [B, R] window.
    params: the model's state, or a tuple of states (LoRA: (adapters, frozen base)).
    dropout_key: LoRA dropout in this pass (the differentiated one); None: none.
    """
    model = nnx.merge(graphdef, *(params if isinstance(params, tuple) else (params,)))
    prompt_len = tokens.shape[1] - response_len
    if prompt_len < 1:
        raise ValueError(f"tokens {tokens.shape} leave no prompt before the {response_len} response tokens")
    inputs = tokens[:, :-1]
    x = model.embed_tokens(inputs) if images is None else model.embed_rows(inputs, *images, prompt_len)
    positions = positions[..., :-1]
    if positions.ndim == 3:  # [B, 3, T] -> the model's [3, B, T]
        positions = jnp.moveaxis(positions, 1, 0)
    w = model.output_weight().astype(model.config.compute_dtype)
    if packing is None:
        hidden, _ = model.hidden_states(x, positions, attention_mask[:, :-1], dropout_key=dropout_key)
        hidden = hidden[:, prompt_len - 1:]
        return token_logprobs_and_entropy(hidden, w, tokens[:, prompt_len:], chunk_size=chunk_size)
    hidden, to_slots, to_window = packed_hidden_states(model, x, positions, packing, dropout_key)
    if not packing.head_on_slots:
        return token_logprobs_and_entropy(to_window(hidden), w, tokens[:, prompt_len:],
                                          chunk_size=chunk_size)
    # the lm-head on the packed slots: each slot's target is the token after its input
    logp, entropy = token_logprobs_and_entropy(hidden, w, to_slots(tokens[:, 1:]), chunk_size=chunk_size)
    return to_window(logp), to_window(entropy)


def packed_hidden_states(model, x, positions, packing: Packing, dropout_key=None):
    """The decoder on the packed rows: (hidden [p', L, H], to_slots, to_window). Inputs x
    [B, T, H] and positions [B, T] / [3, B, T] are gathered in (to_slots: [B, T, ...] ->
    [p', L, ...]); to_window: [p', L, ...] -> the response window's [B, R, ...]. Blocks run
    along a leading axis of size `packing.shards` that the batch sharding splits, so every
    gather stays on its device."""
    D = packing.shards
    B, T, H = x.shape
    blocked = lambda a: a.reshape(D, a.shape[0] // D, *a.shape[1:])  # noqa: E731
    source, segments = blocked(packing.source), blocked(packing.segments)  # [D, p, L]
    _, p, L = source.shape

    def gather_rows(a):  # [B, T, ...] -> [D * p, L, ...]: the slots' inputs
        a = blocked(a)
        flat = a.reshape(D, -1, *a.shape[3:])
        return jax.vmap(lambda f, i: f[i])(flat, source).reshape(D * p, L, *a.shape[3:])

    packed_positions = (jnp.stack([gather_rows(pos) for pos in positions]) if positions.ndim == 3
                        else gather_rows(positions))
    seg = segments.reshape(D * p, L)
    hidden, _ = model.hidden_states(gather_rows(x), packed_positions, seg >= 0, segment_ids=seg,
                                    dropout_key=dropout_key)
    slots = blocked(packing.response_slot)  # [D, B / D, R]

    def to_window(a):
        flat = a.reshape(D, p * L, *a.shape[2:])
        return jax.vmap(lambda f, i: f[i])(flat, slots).reshape(B, -1, *a.shape[2:])

    return hidden, gather_rows, to_window


def split_micro(tree, micro_batches: int):
    """[B, ...] -> [M, B / M, ...] with micro-batch k = rows k, k + M, k + 2M, ...

    Strided rather than contiguous: a device holding a contiguous block of rows then holds an
    equal share of every micro-batch, so the split needs no communication.
    """
    def one(x):
        return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(one, tree)


def merge_micro(tree):
    """Inverse of `split_micro`."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def constrain(tree, sharding):
    """with_sharding_constraint when a sharding is given (None: leave it to the compiler)."""
    return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)


def compute_logprobs(params, batch: Batch, base=None, *, graphdef, micro_batches: int = 1,
                     chunk_size: int = 1024, micro_sharding=None):
    """(log pi, entropy) [B, R] of the batch's responses under `params`, forward only: the old
    or the reference log-probs (section 1). Micro-batched with lax.map to bound activations.
    base: the frozen weights when params are LoRA adapters (None: params are the whole model)."""
    if base is not None:
        params = (params, base)
    R = batch.response_len
    rows = dict(tokens=batch.tokens, attention_mask=batch.attention_mask, positions=batch.positions,
                images=batch.images, packing=batch.packing)

    def forward(mb):
        return response_logprobs(graphdef, params, mb["tokens"], mb["attention_mask"], mb["positions"],
                                 R, chunk_size, mb["images"], mb["packing"])

    if micro_batches == 1:
        return forward(rows)
    return merge_micro(jax.lax.map(forward, constrain(split_micro(rows, micro_batches), micro_sharding)))
