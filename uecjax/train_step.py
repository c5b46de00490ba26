"""The train step: GRPO, DAPO, UEC-RL, AER and the entropy baselines in one pure, sharded,
jitted update (ALGORITHMS.md sections 2-7, 9).

    trainer = TrainStep(model, loss_config("uec"), OptimConfig(learning_rate=1e-6), mesh)
    params, opt_state, control = trainer.init(nnx.state(model))
    params, opt_state, control, metrics = trainer.step(params, opt_state, control,
                                                       trainer.device_batch(rows))
    control = trainer.update_control(control, metrics)      # AER's host-side update

`train_step` is the pure `(params, opt_state, control, batch) -> (params, opt_state, control,
metrics)`; `TrainStep` jits it on a mesh (explicit shardings, params and optimizer state
donated) and scores rows (`score`: old / reference log-probs). Micro-batches accumulate the
exact gradient of the whole batch, the stabilizer through a surrogate linearised at an anchor
entropy (`LossConfig.stabilizer_anchor`): docs/DESIGN.md, "The train step".
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from uecjax.batch import Batch, PackSpec, to_device
from uecjax.packing import pack
from uecjax.control import ControlState, init_control_state, update_control
from uecjax.objectives.advantages import broadcast_to_tokens
from uecjax.objectives.aggregation import batch_counts
from uecjax.objectives.loss_config import LossConfig
from uecjax.objectives.methods import LossInputs, get_method, loss_terms
from uecjax.models.config import VLConfig
from uecjax.objectives.policy_loss import kl_penalty
from uecjax.offload import HostParams
from uecjax.models.lora import lora_spec
from uecjax.optim import (OptimConfig, OptimConfigError, check_frozen, make_optimizer, make_schedule,
                          scale_updates, stop_gradient_frozen)
from uecjax.parallel import mesh as shd
from uecjax.parallel.hosts import Hosts
from uecjax.rows import Rows
from uecjax.scoring import compute_logprobs, constrain, response_logprobs, split_micro


def _check_batch(batch: Batch, loss_cfg: LossConfig):
    missing = [f for f in ("old_logp", "old_entropy") if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"batch.{missing[0]} is unset: fill old_logp and old_entropy with "
                         "TrainStep.compute_logprobs (or store them with replayed samples)")
    if loss_cfg.beta > 0 and batch.ref_logp is None:
        raise ValueError(f"beta={loss_cfg.beta} needs batch.ref_logp (compute_logprobs with the reference "
                         "params); set beta=0 to train without a reference model")
    if (batch.pixel_values is None) != (batch.vision is None):
        raise ValueError("batch.pixel_values and batch.vision come together (uecjax.vision_inputs."
                         "vision_rows gives both); set both or neither")
    B, R = batch.response_mask.shape
    if batch.tokens.shape[0] != B or batch.tokens.shape[1] <= R:
        raise ValueError(f"tokens {batch.tokens.shape} do not hold a prompt plus the {R} response "
                         f"tokens of response_mask {batch.response_mask.shape}")


def batch_gradients(params, control: ControlState, batch: Batch, base=None, *, graphdef,
                    loss_cfg: LossConfig, micro_batches: int = 1, chunk_size: int = 1024,
                    param_sharding=None, micro_sharding=None, frozen: tuple[str, ...] = (),
                    lora_dropout: float = 0.0):
    """Gradient of the loss of the whole batch, accumulated over micro-batches.

    Returns (grads float32 with the structure of params, metrics, control with H_0 set and the
    rng advanced). Pure; the step adds the optimizer update. frozen: top-level parameter
    groups held constant (`OptimConfig.frozen`): their gradients are zero and, since nothing
    differentiates through them, their backward pass is never computed.
    base: with LoRA, the frozen weights; params are then the adapters alone, the only thing
    differentiated (no gradient or optimizer state of the size of the model exists).
    lora_dropout > 0: the adapters' dropout in the differentiated forward, drawn from the
    controller's rng (scoring and sampling never drop).
    """
    _check_batch(batch, loss_cfg)
    method = get_method(loss_cfg.method)
    M = micro_batches
    mask = batch.response_mask.astype(jnp.float32)
    R = mask.shape[1]
    num_tokens, num_seqs = batch_counts(mask)
    n = jnp.maximum(num_tokens, 1.0)
    adv = batch.advantages.astype(jnp.float32)
    adv = adv * mask if adv.ndim == 2 else broadcast_to_tokens(adv, mask)
    old_entropy_mean = jnp.sum(mask * batch.old_entropy) / n
    # H_0 (section 6) is normally set by the loop from the initial policy's regular samples
    # before any selection (`uecjax.loop.set_h0`); a step that finds it unset takes its own batch's
    # token-mean entropy, and only from a batch that has tokens (an all-padding batch would
    # fix H_0 = 0 for good).
    h0 = jnp.where(jnp.isnan(control.h0) & (num_tokens > 0), old_entropy_mean, control.h0)
    # Still unset (no tokens yet): an infinite bound keeps the stabilizer inactive, not NaN.
    h0_bound = jnp.where(jnp.isnan(h0), jnp.inf, h0)
    key, select_key = jax.random.split(jax.random.wrap_key_data(control.rng))
    dropout_key = jax.random.fold_in(select_key, 1) if lora_dropout > 0 else None
    select = None if method.select is None else method.select(batch.old_logp, adv, mask, select_key, loss_cfg)

    rows = dict(tokens=batch.tokens, attention_mask=batch.attention_mask, positions=batch.positions,
                images=batch.images, packing=batch.packing, mask=mask, adv=adv, old_logp=batch.old_logp.astype(jnp.float32),
                ref_logp=batch.ref_logp, success_rate=batch.success_rate.astype(jnp.float32),
                hard=batch.is_hard.astype(jnp.float32), select=select,
                token_weight=None if batch.token_weight is None else batch.token_weight.astype(jnp.float32))
    micro = constrain(split_micro(rows, M), micro_sharding) if M > 1 else rows

    def forward(p, mb, dropout=None):
        p = stop_gradient_frozen(p, frozen)
        return response_logprobs(graphdef, p if base is None else (p, base), mb["tokens"],
                                 mb["attention_mask"], mb["positions"], R, chunk_size, mb["images"],
                                 mb["packing"], dropout)

    # Where the stabilizer is linearised (docs/DESIGN.md, "The train step"); None: this pass's own mean entropy.
    anchor = old_entropy_mean
    if loss_cfg.stabilizer_anchor == "current":
        anchor = None
        if loss_cfg.stabilizer and M > 1:
            anchor = jax.lax.map(lambda mb: jnp.sum(mb["mask"] * forward(params, mb)[1]), micro).sum() / n

    def micro_loss(p, mb, index=0):
        logp, entropy = forward(p, mb, None if dropout_key is None else jax.random.fold_in(dropout_key, index))
        m = mb["mask"]
        ent_sum = jnp.sum(m * entropy)
        x = LossInputs(
            logp=logp, entropy=entropy, old_logp=mb["old_logp"], ref_logp=mb["ref_logp"],
            adv=mb["adv"], mask=m, success_rate=mb["success_rate"], hard=mb["hard"], select=mb["select"],
            num_tokens=num_tokens, num_seqs=num_seqs, max_len=loss_cfg.agg_max_len or R, h0=h0_bound,
            h_anchor=jax.lax.stop_gradient(ent_sum / n) if anchor is None else anchor,
            aer_alpha=control.aer_alpha, token_weight=mb["token_weight"])
        parts, stats = loss_terms(x, loss_cfg)
        hard_tok = m * mb["hard"][:, None]
        stats.update(entropy=ent_sum, entropy_hard=jnp.sum(hard_tok * entropy),
                     tokens_hard=jnp.sum(hard_tok), kl_old=jnp.sum(m * kl_penalty(logp, x.old_logp)))
        if x.ref_logp is not None:
            stats["kl_ref"] = jnp.sum(m * kl_penalty(logp, x.ref_logp))
        return sum(parts.values()), jax.lax.stop_gradient((parts, stats))

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    to_f32 = functools.partial(jax.tree.map, lambda g: g.astype(jnp.float32))
    if M == 1:
        (_, (parts, stats)), grads = grad_fn(params, micro)
        grads = to_f32(grads)
    else:
        def body(acc, mb_index):
            (_, aux), g = grad_fn(params, *mb_index)
            return constrain(jax.tree.map(jnp.add, acc, to_f32(g)), param_sharding), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        grads, (parts, stats) = jax.lax.scan(body, constrain(zeros, param_sharding),
                                             (micro, jnp.arange(M)))
        parts, stats = jax.tree.map(lambda v: v.sum(axis=0), (parts, stats))

    metrics = _metrics(parts, stats, batch, mask, num_tokens, num_seqs, h0, control, loss_cfg)
    return grads, metrics, control.replace(h0=h0, rng=jax.random.key_data(key))


def _metrics(parts, stats, batch, mask, num_tokens, num_seqs, h0, control, loss_cfg):
    """Step metrics from the accumulated loss parts and token sums (no extra forward)."""
    n = jnp.maximum(num_tokens, 1.0)
    stats = dict(stats)
    entropy = stats.pop("entropy") / n
    ent_hard, tok_hard = stats.pop("entropy_hard"), stats.pop("tokens_hard")
    h_max = loss_cfg.kappa * h0
    penalty = loss_cfg.lam * jnp.square(jax.nn.relu(entropy - h_max))
    losses = {f"loss/{k}": v for k, v in parts.items()}
    if "stab" in parts:  # the parts hold the gradient surrogate; report the penalty itself
        losses["loss/stab"] = penalty
    metrics = {
        "loss": sum(losses.values()), **losses,
        "entropy": entropy,
        "entropy_hard": ent_hard / jnp.maximum(tok_hard, 1.0),
        "entropy_easy": (entropy * n - ent_hard) / jnp.maximum(num_tokens - tok_hard, 1.0),
        "h0": h0, "h_max": h_max, "stabilizer_penalty": penalty,
        "aer_alpha": control.aer_alpha, "aer_target": loss_cfg.aer_rho * h0,
        "tokens": num_tokens, "seqs": num_seqs,
    }
    # token fractions and token means; seq_* stats are sums over sequences
    metrics.update({k: v / (jnp.maximum(num_seqs, 1.0) if k.startswith("seq_") else n) for k, v in stats.items()})
    if batch.sampler_logp is not None:
        # Sampler-vs-trainer parity: rows sampled at another temperature (UEC's t' exploration
        # rows) differ by design, so only the regular rows count.
        regular = mask if batch.explore is None else mask * (1.0 - batch.explore.astype(jnp.float32))[:, None]
        gap = jnp.abs(batch.sampler_logp.astype(jnp.float32) - batch.old_logp.astype(jnp.float32))
        metrics["logp_gap"] = jnp.sum(regular * gap) / jnp.maximum(jnp.sum(regular), 1.0)
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def train_step(params, opt_state, control: ControlState, batch: Batch, base=None, *,
               optimizer: optax.GradientTransformation, schedule: Callable,
               advance_schedule: bool = True, **grad_kwargs):
    """One optimizer update on `batch` (docs/DESIGN.md, "The train step"); grad_kwargs go to
    `batch_gradients`.

    The learning rate is schedule(control.step), and control.step counts the updates that
    advance the schedule: advance_schedule=False (replay updates, ALGORITHMS.md section 8)
    updates at the current rate and leaves the count (the optimizer is built with
    `external_lr`, so its own update counter, Adam's bias correction, still counts it).

    Returns (params, opt_state, control, metrics); metrics are float32 scalars: loss and
    loss/<part>, entropy (all, hard, easy prompts), h0, h_max,
    stabilizer_penalty, aer_alpha, aer_target, clip_frac_low/high/dual (seq_clip_frac, _low, _high with
    loss.ratio_level sequence / sequence_token: fractions of sequences), kl_old, kl_ref (with a
    reference), logp_gap (sampler vs trainer, with sampler log-probs), grad_norm (before
    clipping), lr, tokens, seqs, and cov_selected for clip_cov / kl_cov.
    """
    grads, metrics, control = batch_gradients(params, control, batch, base, **grad_kwargs)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    lr = schedule(control.step)
    params = optax.apply_updates(params, scale_updates(updates, lr))
    metrics.update(grad_norm=optax.global_norm(grads), lr=jnp.asarray(lr, jnp.float32))
    return params, opt_state, control.replace(step=control.step + int(advance_schedule)), metrics


class TrainStep:
    """The jitted, sharded `train_step` and `compute_logprobs` for one model and mesh, and the
    scoring of sampled rows (`score`).

    hosts: this process's share of the batch rows (`Hosts.of_mesh`); score_rows: row counts
    scored are padded to a multiple of this (a few compiled shapes; 0: no padding). pack:
    scoring and training forward passes run on packed rows of tokens_per_row slots
    (`uecjax.packing`; 0: the batch's row length).

    A model with LoRA adapters (`uecjax.models.lora.add_lora`) trains them alone: `params`,
    the optimizer state and the checkpoints hold the adapters, and the frozen base weights
    (`self.base`, the model's own arrays, shared with the sampler and never donated) enter
    every jitted function as one more argument. `trainable(model)` gives the params to `init`.
    """

    def __init__(self, model, loss: LossConfig, optim: OptimConfig, mesh: jax.sharding.Mesh, *,
                 micro_batches: int = 1, chunk_size: int = 1024, hosts: Hosts = Hosts(),
                 score_rows: int = 0, pack: bool = False, tokens_per_row: int = 0):
        get_method(loss.method)  # an unknown method fails here, not at the first step
        if micro_batches < 1 or chunk_size < 1:
            raise ValueError(f"micro_batches={micro_batches} and chunk_size={chunk_size} must be >= 1")
        self.lora = lora_spec(model)
        if self.lora is None:
            self.graphdef, params = nnx.split(model)
            self.base = None
        else:
            if optim.frozen:
                raise OptimConfigError(
                    f"OptimConfig.frozen={optim.frozen!r} with LoRA: every base weight is frozen "
                    "already and only the adapters train; leave it empty (model.freeze_vision "
                    "has no effect with model.lora.rank > 0)")
            self.graphdef, params, self.base = nnx.split(model, nnx.LoRAParam, ...)
        self.loss, self.optim, self.mesh = loss, optim, mesh
        self.micro_batches, self.chunk_size = micro_batches, chunk_size
        self.hosts, self.score_rows = hosts, score_rows
        shards = 1
        for axis in shd.BATCH_AXES:
            shards *= mesh.shape.get(axis, 1)
        # Packed forward passes (uecjax.packing): one block per batch shard and micro-batch.
        self.pack_spec = PackSpec(tokens_per_row, shards, micro_batches) if pack else None
        # A Qwen2.5-VL's rows carry images: their patch layouts need its config.
        self.vl_config = model.config if isinstance(model.config, VLConfig) else None
        self.optimizer = make_optimizer(optim, external_lr=True)
        self.schedule = make_schedule(optim)
        abstract = jax.eval_shape(lambda p: p, params)
        self.param_shardings = shd.param_shardings(mesh, abstract)
        self.opt_shardings = shd.opt_state_shardings(mesh, self.optimizer, abstract, self.param_shardings)
        self.batch_sharding = shd.batch_sharding(mesh)
        self.replicated = shd.replicated(mesh)
        micro_sharding = NamedSharding(mesh, PartitionSpec(None, shd.BATCH_AXES))
        check_frozen(params, optim.frozen)
        # The frozen base (LoRA): one more, never donated, argument of every jitted function.
        self.base_shardings = None if self.base is None else shd.param_shardings(
            mesh, jax.eval_shape(lambda p: p, self.base))
        self._base = () if self.base is None else (self.base,)
        base_in = () if self.base is None else (self.base_shardings,)
        self.grad_kwargs = dict(graphdef=self.graphdef, loss_cfg=loss, micro_batches=micro_batches,
                                chunk_size=chunk_size, param_sharding=self.param_shardings,
                                micro_sharding=micro_sharding, frozen=tuple(optim.frozen),
                                lora_dropout=0.0 if self.lora is None else self.lora.dropout)
        self.pure_step = functools.partial(train_step, optimizer=self.optimizer, schedule=self.schedule,
                                           **self.grad_kwargs)
        step_shardings = dict(
            in_shardings=(self.param_shardings, self.opt_shardings, self.replicated, self.batch_sharding,
                          *base_in),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated, self.replicated),
            donate_argnums=(0, 1))
        self._step = jax.jit(self.pure_step, **step_shardings)
        # Replay updates (section 8): same step, the learning-rate schedule stays where it is.
        self._replay_step = jax.jit(functools.partial(self.pure_step, advance_schedule=False),
                                    **step_shardings)
        self._grads = jax.jit(
            functools.partial(batch_gradients, **self.grad_kwargs),
            in_shardings=(self.param_shardings, self.replicated, self.batch_sharding, *base_in),
            out_shardings=(self.param_shardings, self.replicated, self.replicated))
        self._logprobs = jax.jit(
            functools.partial(compute_logprobs, graphdef=self.graphdef, micro_batches=micro_batches,
                              chunk_size=chunk_size, micro_sharding=micro_sharding),
            in_shardings=(self.param_shardings, self.batch_sharding, *base_in),
            out_shardings=self.batch_sharding)

    def trainable(self, model):
        """The model's trained parameters, for `init`: its LoRA adapters, else its whole state."""
        return nnx.state(model) if self.lora is None else nnx.state(model, nnx.LoRAParam)

    def init(self, params, seed: int = 0, h0: float | None = None, *, copy: bool = True):
        """(params placed on the mesh, optimizer state, controller state).

        copy=True gives the step its own buffers: it donates them, and the caller's arrays
        (e.g. the model the sampler reads) must survive that. (`jax.device_put` may alias a
        replicated shard to its input, so the copy is a jitted one.) copy=False moves them.
        """
        place = (lambda p: jax.tree.map(jnp.copy, p)) if copy else (lambda p: p)
        params = jax.jit(place, out_shardings=self.param_shardings)(params)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.opt_shardings)(params)
        control = shd.put_replicated(init_control_state(self.loss, seed, h0), self.replicated)
        return params, opt_state, control

    def place_batch(self, batch: Batch) -> Batch:
        """The host batch as global arrays on the mesh, each process giving only its own rows
        (`uecjax.parallel.mesh.global_batch`); arrays already on devices pass through. With
        packing on, a batch without its packed layout (a hand-made one) gets it here."""
        shd.check_batch_size(batch.tokens.shape[0], self.mesh, self.micro_batches)
        if self.pack_spec is not None and batch.packing is None:
            if self.hosts.count > 1:
                raise ValueError("train.pack with several processes: a batch built outside "
                                 "device_batch has no packed layout, and the processes cannot "
                                 "agree on one here; build it from rollout rows with "
                                 "TrainStep.device_batch(rows)")
            spec = self.pack_spec
            batch = batch.replace(packing=pack(
                np.asarray(batch.attention_mask), batch.response_len,
                tokens_per_row=spec.tokens_per_row, shards=spec.shards, micro_batches=spec.micro_batches))
        return shd.global_batch(batch, self.batch_sharding)

    def device_batch(self, rows: Rows) -> Batch:
        """This process's rows -> the global batch of the step (`uecjax.batch.to_device`)."""
        return to_device(rows, self.batch_sharding, hosts=self.hosts, vl_config=self.vl_config,
                         tau_hard=self.loss.tau_hard, explore_is_cap=self.loss.explore_is_cap,
                         pack_spec=self.pack_spec)

    def score(self, params, rows: Rows, with_ref: bool = True, *,
              ref_params: HostParams | None = None):
        """(old_logp, old_entropy, ref_logp or None) of this process's rows: the log-probs at
        temperature 1 under `params` and, with ref_params and with_ref, the reference's.

        A collective with several shares (each brings its own rows, the same count on every
        process, and gets its own back). Row counts are padded to a multiple of score_rows
        with rows that weigh nothing.
        """
        n = len(rows)
        if self.score_rows and n % self.score_rows:
            padding = Rows.empty(self.score_rows - n % self.score_rows, rows.prompt_tokens.shape[1],
                                 rows.response_tokens.shape[1], rows.ref_logp is not None)
            rows = Rows.concat([rows, padding])
        batch = to_device(rows, self.batch_sharding, hosts=self.hosts, vl_config=self.vl_config,
                          pack_spec=self.pack_spec)
        logp, entropy = (self.hosts.take(x)[:n] for x in self.compute_logprobs(params, batch))
        ref = None
        if ref_params is not None and with_ref:
            ref = self.hosts.take(self.compute_logprobs(ref_params.on_device(), batch)[0])[:n]
        return logp, entropy, ref

    def step(self, params, opt_state, control: ControlState, batch: Batch, *,
             advance_schedule: bool = True):
        """One update; params and opt_state are donated (do not reuse the arguments).
        advance_schedule=False: a replay update, at the current learning rate (`train_step`)."""
        fn = self._step if advance_schedule else self._replay_step
        return fn(params, opt_state, control, self.place_batch(batch), *self._base)

    def gradients(self, params, control: ControlState, batch: Batch):
        """(grads, metrics, control) of `batch_gradients`, jitted; nothing is donated."""
        return self._grads(params, control, self.place_batch(batch), *self._base)

    def compute_logprobs(self, params, batch: Batch):
        """(log pi, entropy) [B, R] of the responses under params (old or reference model).

        Forward only: nothing is differentiated, so no activations are kept for a backward
        pass (the model's remat setting does not matter here); micro-batches bound the live
        activations to one micro-batch's forward.
        """
        return self._logprobs(params, self.place_batch(batch), *self._base)

    def lower(self, params, opt_state, control: ControlState, batch: Batch, base=None):
        """(train step, log-prob pass) lowered for these (possibly abstract, sharded) arguments,
        for `.compile().memory_analysis()` without running anything (uecjax.dry_run); base:
        the frozen weights of a LoRA model (default `self.base`)."""
        extra = self._base if base is None else (base,)
        return (self._step.lower(params, opt_state, control, batch, *extra),
                self._logprobs.lower(params, batch, *extra))

    def update_control(self, control: ControlState, metrics) -> ControlState:
        """Host-side controller update after a step (AER's coefficient, section 9)."""
        return shd.put_replicated(update_control(control, metrics, self.loss), self.replicated)
