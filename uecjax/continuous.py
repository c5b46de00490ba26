"""Continuous batching for `Sampler`: a fixed number of decode slots, refilled as rows finish.

A call's sequences (prompt-major, sequence `i * n + j` is sample j of prompt i) wait in a
queue. Three compiled functions, all with static shapes:

    prefill   every prompt once into a prompt cache [prompts, kv_heads, P, head_dim] per layer,
              and the first token of every sequence (the G samples of a prompt share the
              prefill: their first tokens are G draws from its logits).
    run       a `lax.while_loop` of decode steps over S slots. Before a step, when a slot is
              free and sequences wait, up to `insert` of them enter free slots: the prompt's
              cached keys / values are copied into the slot's first P cache columns (no model
              compute) and the slot restarts at response position 1. A slot frees when its
              sequence emits a stop id or reaches its length limit.
    compact   once the queue is empty and at most S / 2 slots are busy, the busy slots move
              into an S / 2 batch (the loop exits, the host calls compact, then run again), so
              the long tail decodes on a smaller batch: slot utilisation stays high without
              knowing lengths in advance. Slot counts are S, S / 2, ... down to `min_slots`.

Each slot writes its keys at its own cache column (P + its position - 1; per-row
`cache_index`), so slots at different positions decode in one batch. Stale columns of a
slot's previous sequence are never read: the causal mask hides columns past the slot's
position, and every column before it was written by the current sequence. Tokens are drawn
with per-sequence keys (`uecjax.token_sampling`), so the output equals the static path's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from uecjax.models.qwen2 import KVCache
from uecjax.token_sampling import _sample, sequence_keys, token_keys


class Slots(NamedTuple):
    """The decode batch: S slots, each holding one sequence (or free)."""

    cache: KVCache  # per-layer tuples of [S, kv_heads, P + R, head_dim]
    key_mask: jax.Array  # [S, P + R] bool: the prompt's real tokens, then every response column
    seq: jax.Array  # [S] int32: the sequence in the slot (stale when free)
    t: jax.Array  # [S] int32: tokens generated so far (the next is written at response index t)
    last: jax.Array  # [S] int32: the last generated token (the next step's input)
    free: jax.Array  # [S] bool


class Work(NamedTuple):
    """Everything but the slots: the queue position, the outputs, the counters."""

    next_seq: jax.Array  # int32: the first sequence still waiting
    tokens: jax.Array  # [Q, R] int32 (Q = prompt rows x n), pad_id after the end
    logps: jax.Array  # [Q, R] float32
    lengths: jax.Array  # [Q] int32: generated tokens
    stopped: jax.Array  # [Q] bool: ended on a stop id
    steps: jax.Array  # int32: decode steps run
    slot_steps: jax.Array  # int32: sum over steps of S
    useful: jax.Array  # int32: slot-steps that generated a token


class Prompts(NamedTuple):
    """The prefill's results, read by insertions and by every decode step."""

    cache: KVCache  # per-layer tuples of [prompt rows, kv_heads, P, head_dim]
    mask: jax.Array  # [prompt rows, P] bool
    first_position: jax.Array  # [prompt rows] int32: the first response token's RoPE position
    first_token: jax.Array  # [Q] int32
    first_done: jax.Array  # [Q] bool: the first token ended the sequence
    keys: jax.Array  # [Q] per-sequence PRNG keys
    limits: jax.Array  # [Q] int32: each sequence's response limit


class ContinuousDecoder:
    """The compiled pieces, bound to a `Sampler` (its pad id, cache dtype, mesh helpers)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.prefill = jax.jit(self._prefill_fn,
                               static_argnames=("graphdef", "n", "mode", "slots", "R"))
        self.run = jax.jit(self._run_fn, static_argnames=("graphdef", "n", "mode", "insert",
                                                          "shrink_at"),
                           donate_argnames=("slots", "work"))
        self.compact = jax.jit(self._compact_fn)  # a smaller output: nothing to donate

    # -- prefill ----------------------------------------------------------------------------
    def _prefill_fn(self, graphdef, state, tokens, mask, positions, vision, offset, prompt_index,
                    limits, key, temperature, top_p, stop_ids, *, n, mode, slots, R):
        """Every prompt once, every sequence's first token; empty slots. Returns (Prompts,
        Slots, Work) with the first tokens already in Work's outputs."""
        s = self.sampler
        s.compile_count += 1
        model = nnx.merge(graphdef, state)
        B, P = tokens.shape
        if positions.ndim == 3:  # M-RoPE positions come row-major [B, 3, P]
            positions = positions.transpose(1, 0, 2)
        cache = model.init_cache(B, P, s.cache_dtype)
        heads = s._kv_axis(cache.k.shape[2])
        x = model.embed_tokens(tokens) if vision is None else model.embed_rows(tokens, *vision)
        hidden, cache = model.hidden_states(x, positions, mask, cache=cache, cache_index=0)
        logits = jnp.repeat(model.logits(hidden[:, -1:])[:, 0], n, axis=0)
        keys = sequence_keys(key, jnp.repeat(prompt_index, n), jnp.tile(jnp.arange(n), B))
        first, first_logp = _sample(logits, token_keys(keys, 0), temperature, top_p,
                                    **mode._asdict())
        stopped = jnp.isin(first, stop_ids)
        layers = cache.k.shape[0]
        per_layer = lambda c: tuple(s._constrain(c[i], None, None, heads) for i in range(layers))  # noqa: E731
        prompts = Prompts(cache=KVCache(per_layer(cache.k), per_layer(cache.v)),
                          mask=mask.astype(bool), first_position=mask.sum(axis=1) + offset,
                          first_token=first, first_done=stopped | (limits <= 1), keys=keys,
                          limits=limits)

        shape = (slots, cache.k.shape[2], P + R, cache.k.shape[4])
        zeros = lambda: s._rows(jnp.zeros(shape, cache.k.dtype), heads)  # noqa: E731
        slot_state = Slots(
            cache=KVCache(tuple(zeros() for _ in range(layers)), tuple(zeros() for _ in range(layers))),
            key_mask=s._rows(jnp.zeros((slots, P + R), bool)),
            seq=s._rows(jnp.zeros((slots,), jnp.int32)), t=s._rows(jnp.ones((slots,), jnp.int32)),
            last=s._rows(jnp.zeros((slots,), jnp.int32)), free=s._rows(jnp.ones((slots,), bool)))
        Q = B * n
        work = Work(next_seq=jnp.int32(0),
                    tokens=jnp.full((Q, R), s.pad_id, jnp.int32).at[:, 0].set(first),
                    logps=jnp.zeros((Q, R), jnp.float32).at[:, 0].set(first_logp),
                    lengths=jnp.ones((Q,), jnp.int32), stopped=stopped,
                    steps=jnp.int32(0), slot_steps=jnp.int32(0), useful=jnp.int32(0))
        return prompts, slot_state, work

    # -- the decode loop --------------------------------------------------------------------
    def _run_fn(self, graphdef, state, slots: Slots, work: Work, prompts: Prompts,
                num_sequences, temperature, top_p, stop_ids, *, n, mode, insert, shrink_at):
        """Decodes until every sequence is done, or until the queue is empty and at most
        `shrink_at` slots are busy (then the caller compacts). Returns (slots, work)."""
        s = self.sampler
        s.compile_count += 1
        model = nnx.merge(graphdef, state)
        layers = model.layer_list()
        S = slots.free.shape[0]
        P = prompts.mask.shape[1]
        Q = work.lengths.shape[0]
        heads = s._kv_axis(slots.cache.k[0].shape[1])

        def constrain(slots: Slots) -> Slots:
            cache = jax.tree.map(lambda c: s._rows(c, heads), slots.cache)
            return Slots(cache, *map(s._rows, slots[1:]))

        def fill(carry):
            """Up to `insert` waiting sequences into free slots (the first free ones)."""
            slots, work = carry
            candidates = jnp.argsort(~slots.free, stable=True)[:insert]  # free slots first
            seq = work.next_seq + jnp.arange(insert, dtype=jnp.int32)
            ok = slots.free[candidates] & (seq < num_sequences)
            target = jnp.where(ok, candidates, S)  # S: out of range, dropped
            seq = jnp.minimum(seq, Q - 1)
            prompt = seq // n
            put = lambda a, v: a.at[target].set(v, mode="drop")  # noqa: E731
            cache = KVCache(
                tuple(c.at[target, :, :P].set(p[prompt].astype(c.dtype), mode="drop")
                      for c, p in zip(slots.cache.k, prompts.cache.k)),
                tuple(c.at[target, :, :P].set(p[prompt].astype(c.dtype), mode="drop")
                      for c, p in zip(slots.cache.v, prompts.cache.v)))
            key_mask = slots.key_mask.at[target, :P].set(prompts.mask[prompt], mode="drop")
            key_mask = key_mask.at[target, P:].set(True, mode="drop")
            slots = Slots(cache, key_mask, put(slots.seq, seq), put(slots.t, 1),
                          put(slots.last, prompts.first_token[seq]),
                          put(slots.free, prompts.first_done[seq]))
            return constrain(slots), work._replace(next_seq=work.next_seq + ok.sum(dtype=jnp.int32))

        def cond(carry):
            slots, work = carry
            busy = (~slots.free).sum()
            waiting = work.next_seq < num_sequences
            return (waiting | (busy > 0)) & (waiting | (busy > shrink_at))

        def body(carry):
            slots, work = carry
            slots, work = jax.lax.cond(jnp.any(slots.free) & (work.next_seq < num_sequences),
                                       fill, lambda c: c, (slots, work))
            active = ~slots.free
            prompt = slots.seq // n
            position = (prompts.first_position[prompt] + slots.t - 1)[:, None]
            hidden, cache = model.hidden_states(
                model.embed_tokens(slots.last[:, None]), position, slots.key_mask,
                cache=slots.cache, cache_index=P + slots.t - 1, layers=layers)
            logits = model.logits(hidden)[:, 0]
            token, logp = _sample(logits, token_keys(prompts.keys[slots.seq], slots.t),
                                  temperature, top_p, **mode._asdict())
            out = jnp.where(active, slots.seq, Q)  # inactive slots write nowhere
            stop = jnp.isin(token, stop_ids)
            work = work._replace(
                tokens=work.tokens.at[out, slots.t].set(token, mode="drop"),
                logps=work.logps.at[out, slots.t].set(logp, mode="drop"),
                lengths=work.lengths.at[out].set(slots.t + 1, mode="drop"),
                stopped=work.stopped.at[out].set(stop, mode="drop"),
                steps=work.steps + 1, slot_steps=work.slot_steps + S,
                useful=work.useful + active.sum(dtype=jnp.int32))
            t = jnp.where(active, slots.t + 1, slots.t)
            free = slots.free | stop | (t >= prompts.limits[slots.seq])
            slots = Slots(cache, slots.key_mask, slots.seq, t, jnp.where(active, token, slots.last),
                          free)
            return constrain(slots), work

        return jax.lax.while_loop(cond, body, (constrain(slots), work))

    def _compact_fn(self, slots: Slots) -> Slots:
        """The busy slots (at most half) into a batch of S / 2 slots."""
        s = self.sampler
        S = slots.free.shape[0]
        keep = jnp.argsort(slots.free, stable=True)[:S // 2]  # busy slots first
        heads = s._kv_axis(slots.cache.k[0].shape[1])
        cache = jax.tree.map(lambda c: s._rows(c[keep], heads), slots.cache)
        return Slots(cache, *(s._rows(x[keep]) for x in slots[1:]))
