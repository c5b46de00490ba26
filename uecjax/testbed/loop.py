"""The whole RL loop as one compiled program, `vmap`ped over seeds (and hyperparameter values).

    program = CompiledLoop(model, train_task, eval_task, reward_fn, cfg, loss_cfg, optim)
    out = program.run(seeds=jnp.arange(5))                    # one jit, 5 seeds side by side
    out = program.run(seeds=..., sweep={"alpha": jnp.array([...])})   # + one value per run

Following PureJaxRL, sampling (`Sampler.generate_traced`), a `jnp` reward, group advantages,
success rates, section-8 exploration, the old / reference log-prob pass and the update
(`uecjax.train_step.train_step`) run inside one `jit`: the library's code, not copies of it.
Held-out evaluation runs in the same program and returns per-prompt correct counts for Pass@k.
Static shapes change a few details of the host loop (`uecjax.loop`): dropped rows are masked,
not refilled; exploration has `explore_prompts` slots per step; there is no replay buffer.
docs/DESIGN.md, "The compiled testbed".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uecjax.batch import Batch
from uecjax.control import init_control_state, update_control_traced
from uecjax.objectives.advantages import group_advantages, overlong_penalty
from uecjax.objectives.entropy_control import gate_weight
from uecjax.objectives.loss_config import LossConfig
from uecjax.optim import OptimConfig, make_optimizer, make_schedule
from uecjax.rollout import ROLLOUT_PRESETS
from uecjax.sampler import Sampler
from uecjax.scoring import compute_logprobs
from uecjax.train_step import train_step


class TaskArrays(NamedTuple):
    """A task's prompts as device arrays: [N, P] left-padded prompts and, per prompt, whatever
    the reward needs (`answer`, a pytree of [N, ...] arrays) and a difficulty level [N]."""

    prompts: jax.Array  # [N, P] int32
    prompt_mask: jax.Array  # [N, P] int32
    answer: Any  # pytree of [N, ...] arrays, one row per prompt, passed to the reward
    level: jax.Array  # [N] int32


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Rollout and schedule of the compiled loop; the loss is a LossConfig, the optimizer an
    OptimConfig, as in `uecjax.loop`."""

    prompts_per_step: int = 16  # B
    group_size: int = 8  # G
    max_new_tokens: int = 12  # R
    temperature: float = 1.0
    updates_per_rollout: int = 1  # mini-batch updates per rollout (rows shuffled, equal parts)
    steps: int = 200  # rollouts
    eval_every: int = 25  # rollouts between held-out evaluations (steps % eval_every == 0)
    eval_samples: int = 256  # samples per held-out prompt (Pass@k for k <= this)
    eval_chunk: int = 16  # held-out prompts sampled at a time (bounds the KV cache)
    # -- section 8, rollout-level exploration (ROLLOUT_PRESETS sets these for uec) --
    explore: bool = False
    explore_prompts: int = 4  # slots per step (static shapes, module docstring)
    explore_samples: int = 8  # G'
    explore_temperature: float = 1.2  # T'
    explore_threshold: float = 0.01  # a prompt is hard for exploration when every accuracy is below
    retention: bool = False
    retain_min: float = 0.05
    explore_retain_min: float = 1.0
    retain_gated: bool = True
    drop_overlong_positive: bool = False
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        for name in ("prompts_per_step", "max_new_tokens", "updates_per_rollout", "steps",
                     "eval_every", "eval_samples", "eval_chunk", "explore_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name}={getattr(self, name)}: must be >= 1")
        if self.group_size < 2 or (self.explore and self.explore_samples < 2):
            raise ValueError("group_size and explore_samples must be >= 2 (group advantages)")
        if self.steps % self.eval_every:
            raise ValueError(f"steps={self.steps} must be a multiple of eval_every={self.eval_every}")
        if self.explore and self.explore_prompts > self.prompts_per_step:
            raise ValueError(f"explore_prompts={self.explore_prompts} exceeds prompts_per_step")
        if self.rows % self.updates_per_rollout:
            raise ValueError(f"the {self.rows} rows of a step do not split into "
                             f"updates_per_rollout={self.updates_per_rollout} equal mini-batches")

    @property
    def rows(self) -> int:
        explore = self.explore_prompts * self.explore_samples if self.explore else 0
        return self.prompts_per_step * self.group_size + explore


def loop_config(method: str, **overrides) -> LoopConfig:
    """The method's rollout preset (`uecjax.rollout.ROLLOUT_PRESETS`) then `overrides`."""
    preset = dict(ROLLOUT_PRESETS.get(method, {}))
    if preset.pop("replay", False):
        raise ValueError(f"method {method!r} needs the replay buffer, which only the host loop "
                         "(uecjax.train) has")
    return LoopConfig(**{**preset, **overrides})


def _gather(tree, idx):
    return jax.tree.map(lambda a: a[idx], tree)


def _repeat(tree, n):
    return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), tree)


class CompiledLoop:
    """The compiled loop for one model, task, method and optimizer (module docstring).

    reward_fn(response_tokens [R], response_mask [R], *answer_row) -> float32 accuracy in
    [0, 1], jnp, one row (it is vmapped). The reward is the accuracy (format weight 0).
    """

    def __init__(self, model, train_task: TaskArrays, eval_task: TaskArrays,
                 reward_fn: Callable, cfg: LoopConfig, loss_cfg: LossConfig, optim: OptimConfig):
        self.cfg, self.loss_cfg, self.optim = cfg, loss_cfg, optim
        self.train_task, self.eval_task = train_task, eval_task
        self.reward_fn = jax.vmap(reward_fn)
        self.sampler = Sampler(model, pad_id=cfg.pad_id)
        self.graphdef, self.params0 = nnx.split(model)
        self.optimizer = make_optimizer(optim, external_lr=True)
        self.schedule = make_schedule(optim)
        n_eval = eval_task.prompts.shape[0]
        if n_eval % cfg.eval_chunk:
            raise ValueError(f"{n_eval} held-out prompts do not split into eval_chunk={cfg.eval_chunk}")
        if train_task.prompts.shape[0] < cfg.prompts_per_step:
            raise ValueError(f"{train_task.prompts.shape[0]} train prompts, fewer than "
                             f"prompts_per_step={cfg.prompts_per_step}")
        self._run = jax.jit(jax.vmap(self._run_one, in_axes=(0, 0)))

    # -- pieces, traced --------------------------------------------------------------------
    def generate(self, params, prompts, mask, key, n, temperature):
        return self.sampler.generate_traced(params, prompts, mask, key, n=n,
                                            max_new_tokens=self.cfg.max_new_tokens,
                                            temperature=temperature,
                                            stop_token_ids=self.cfg.stop_token_ids)

    def _rows(self, prompts, pmask, resp, valid):
        """Batch sequence fields of sampled rows: tokens, attention mask, positions."""
        tokens = jnp.concatenate([prompts, resp], axis=1)
        attn = jnp.concatenate([pmask, valid.astype(jnp.int32)], axis=1)
        positions = jnp.maximum(jnp.cumsum(attn, axis=1) - 1, 0).astype(jnp.int32)
        return tokens, attn, positions

    def rollout(self, params, key, loss_cfg: LossConfig):
        """One step's rows as a Batch (old log-probs filled) and rollout statistics."""
        cfg, task = self.cfg, self.train_task
        B, G, R = cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens
        k_pick, k_sample, k_explore, k_slots = jax.random.split(key, 4)
        idx = jax.random.choice(k_pick, task.prompts.shape[0], (B,), replace=False)
        prompts, pmask = task.prompts[idx], task.prompt_mask[idx]
        resp, valid, sampler_logp, finished = self.generate(params, prompts, pmask, k_sample, G,
                                                            cfg.temperature)
        answers = _repeat(_gather(task.answer, idx), G)
        acc = self.reward_fn(resp, valid, *answers).astype(jnp.float32)
        lengths = valid.sum(axis=1)
        reward = acc
        if loss_cfg.overlong_buffer > 0:  # DAPO's soft overlong shaping (section 7)
            reward = reward + overlong_penalty(lengths, R, max(1, int(round(loss_cfg.overlong_buffer * R))),
                                               loss_cfg.overlong_factor)
        adv = group_advantages(reward, G, loss_cfg.advantage)
        p = acc.reshape(B, G).mean(axis=1)  # success rate p_q (section 5)
        p_rows = jnp.repeat(p, G)
        gated = (gate_weight(p_rows, loss_cfg.gate, loss_cfg.gate_tau, loss_cfg.gate_s) > 0) if (
            loss_cfg.explore and cfg.retain_gated) else jnp.zeros_like(p_rows, bool)
        keep = jnp.ones_like(acc, bool)
        if loss_cfg.dynamic_sampling:  # groups whose accuracies all agree carry no signal (section 7)
            g = acc.reshape(B, G)
            informative = jnp.repeat(jnp.any(g != g[:, :1], axis=1), G)
            keep &= informative | gated
        if cfg.retention:
            keep &= (jnp.abs(adv) > cfg.retain_min) | gated
        if cfg.drop_overlong_positive:
            keep &= ~(~finished & (adv > 0))
        explore_flag = jnp.zeros_like(acc)
        rows = dict(prompts=jnp.repeat(prompts, G, axis=0), pmask=jnp.repeat(pmask, G, axis=0),
                    resp=resp, valid=valid, keep=keep, adv=adv, p=p_rows, explore=explore_flag,
                    sampler_logp=sampler_logp)
        stats = {"reward": reward.mean(), "accuracy": acc.mean(),
                 "response_length": lengths.mean().astype(jnp.float32),
                 "hard_prompt_fraction": jnp.mean(p <= loss_cfg.tau_hard),
                 "solved_none_fraction": jnp.mean(p == 0.0)}
        if cfg.explore:
            rows, stats = self._explore(params, rows, stats, prompts, pmask, idx, acc, p,
                                        k_explore, k_slots)
        tokens, attn, positions = self._rows(rows["prompts"], rows["pmask"], rows["resp"], rows["valid"])
        response_mask = (rows["valid"] & rows["keep"][:, None]).astype(jnp.float32)
        batch = Batch(tokens=tokens, attention_mask=attn, positions=positions,
                      response_mask=response_mask, advantages=rows["adv"] * rows["keep"],
                      success_rate=rows["p"], is_hard=(rows["p"] <= loss_cfg.tau_hard).astype(jnp.float32),
                      sampler_logp=rows["sampler_logp"],
                      explore=rows["explore"] if cfg.explore else None)
        old_logp, old_entropy = compute_logprobs(params, batch, graphdef=self.graphdef)
        batch = batch.replace(old_logp=old_logp, old_entropy=old_entropy)
        if loss_cfg.beta > 0:
            ref_logp, _ = compute_logprobs(self.params0, batch, graphdef=self.graphdef)
            batch = batch.replace(ref_logp=ref_logp)
        # Response-token entropy of the regular samples before any selection: the curve of the
        # experiment, and H_0 at the first step (as `uecjax.loop.set_h0` sets it).
        regular = rows["valid"].astype(jnp.float32) * (1.0 - rows["explore"])[:, None]
        stats["entropy"] = jnp.sum(regular * old_entropy) / jnp.maximum(regular.sum(), 1.0)
        stats["kept_rows"] = jnp.sum(rows["keep"].astype(jnp.float32))
        return batch, stats

    def _explore(self, params, rows, stats, prompts, pmask, idx, acc, p, key, k_slots):
        """Section 8: up to explore_prompts hard prompts get G' responses at T'."""
        cfg, loss_cfg = self.cfg, self.loss_cfg
        B, G, Gx = cfg.prompts_per_step, cfg.group_size, cfg.explore_samples
        hard = jnp.all(acc.reshape(B, G) < cfg.explore_threshold, axis=1)
        # Hard prompts first, in random order among themselves.
        order = jnp.argsort(jnp.where(hard, 0.0, 1.0) + 0.5 * jax.random.uniform(k_slots, (B,)))
        slots = order[:cfg.explore_prompts]
        active = jnp.repeat(hard[slots], Gx)
        xp, xm = prompts[slots], pmask[slots]
        resp, valid, logp, finished = self.generate(params, xp, xm, key, Gx, cfg.explore_temperature)
        answers = _repeat(_gather(self.train_task.answer, idx[slots]), Gx)
        acc_x = self.reward_fn(resp, valid, *answers).astype(jnp.float32)
        adv_x = group_advantages(acc_x, Gx, loss_cfg.advantage)
        keep = active
        if cfg.retention:
            keep &= jnp.abs(adv_x) > cfg.explore_retain_min
        if cfg.drop_overlong_positive:
            keep &= ~(~finished & (adv_x > 0))
        cat = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
        rows = dict(prompts=cat(rows["prompts"], jnp.repeat(xp, Gx, axis=0)),
                    pmask=cat(rows["pmask"], jnp.repeat(xm, Gx, axis=0)),
                    resp=cat(rows["resp"], resp), valid=cat(rows["valid"], valid),
                    keep=cat(rows["keep"], keep), adv=cat(rows["adv"], adv_x),
                    p=cat(rows["p"], jnp.repeat(p[slots], Gx)),
                    explore=cat(rows["explore"], jnp.ones_like(acc_x)),
                    sampler_logp=cat(rows["sampler_logp"], logp))
        stats = {**stats, "explore_prompts": jnp.sum(hard[slots].astype(jnp.float32)),
                 "explore_accuracy": jnp.sum(acc_x * active) / jnp.maximum(jnp.sum(active), 1.0),
                 "explore_kept": jnp.sum(keep.astype(jnp.float32))}
        return rows, stats

    def update(self, params, opt_state, control, batch: Batch, loss_cfg: LossConfig):
        """One `uecjax.train_step.train_step` on `batch` (the library's update, unchanged)."""
        return train_step(params, opt_state, control, batch, optimizer=self.optimizer,
                          schedule=self.schedule, graphdef=self.graphdef, loss_cfg=loss_cfg)

    def evaluate(self, params, key):
        """Correct samples out of eval_samples per held-out prompt [N_eval] int32, and the
        mean of -log p of the sampled tokens (an estimate of the response-token entropy)."""
        cfg, task = self.cfg, self.eval_task
        n, c = cfg.eval_samples, cfg.eval_chunk
        chunks = jax.tree.map(lambda a: a.reshape(-1, c, *a.shape[1:]),
                              (task.prompts, task.prompt_mask, task.answer))
        keys = jax.random.split(key, task.prompts.shape[0] // c)

        def one(args):
            (prompts, pmask, answer), k = args
            resp, valid, logp, _ = self.generate(params, prompts, pmask, k, n, 1.0)
            acc = self.reward_fn(resp, valid, *_repeat(answer, n))
            tokens = valid.sum()
            return acc.reshape(c, n).sum(axis=1).astype(jnp.int32), -logp.sum(), tokens

        correct, nll, tokens = jax.lax.map(one, (chunks, keys))
        return correct.reshape(-1), nll.sum() / jnp.maximum(tokens.sum(), 1)

    # -- the program -----------------------------------------------------------------------
    def _run_one(self, seed, sweep):
        cfg = self.cfg
        loss_cfg = self.loss_cfg.with_traced(**sweep) if sweep else self.loss_cfg
        params = self.params0
        opt_state = self.optimizer.init(params)
        control = init_control_state(loss_cfg, seed)
        key = jax.random.fold_in(jax.random.key(0), seed)

        def step(carry, _):
            params, opt_state, control, key = carry
            key, k_roll, k_perm = jax.random.split(key, 3)
            batch, stats = self.rollout(params, k_roll, loss_cfg)
            control = control.replace(h0=jnp.where(jnp.isnan(control.h0), stats["entropy"], control.h0))
            U = cfg.updates_per_rollout
            perm = jax.random.permutation(k_perm, cfg.rows) if U > 1 else jnp.arange(cfg.rows)
            minis = jax.tree.map(lambda a: a[perm].reshape(U, cfg.rows // U, *a.shape[1:]), batch)

            def one_update(carry, mini):
                params, opt_state, control = carry
                params, opt_state, control, m = self.update(params, opt_state, control, mini, loss_cfg)
                control = update_control_traced(control, m["entropy"], loss_cfg)
                return (params, opt_state, control), m

            (params, opt_state, control), m = jax.lax.scan(one_update, (params, opt_state, control), minis)
            metrics = {**{f"train/{k}": v.mean() for k, v in m.items()}, **stats}
            return (params, opt_state, control, key), metrics

        def chunk(carry, _):
            carry, metrics = jax.lax.scan(step, carry, None, length=cfg.eval_every)
            key = jax.random.fold_in(carry[3], 1)
            return carry, (metrics, self.evaluate(carry[0], key))

        eval_key = jax.random.fold_in(key, 2)
        first = self.evaluate(params, eval_key)
        carry, (metrics, evals) = jax.lax.scan(chunk, (params, opt_state, control, key), None,
                                               length=cfg.steps // cfg.eval_every)
        correct = jnp.concatenate([first[0][None], evals[0]], axis=0)
        eval_entropy = jnp.concatenate([first[1][None], evals[1]], axis=0)
        metrics = jax.tree.map(lambda x: x.reshape(-1), metrics)
        return dict(metrics=metrics, eval_correct=correct, eval_entropy=eval_entropy,
                    params=carry[0], control=carry[2])

    def _arguments(self, seeds, sweep):
        seeds = jnp.asarray(seeds, jnp.int32)
        sweep = {k: jnp.asarray(v, jnp.float32) for k, v in (sweep or {}).items()}
        for name, values in sweep.items():
            if values.shape != seeds.shape:
                raise ValueError(f"sweep[{name!r}] has shape {values.shape}; give one value per "
                                 f"seed, shape {seeds.shape}")
            for v in np.asarray(values):
                self.loss_cfg.replace(**{name: float(v)})  # raises LossConfigError if out of range
        return seeds, sweep

    def compile(self, seeds, sweep: Mapping[str, Any] | None = None):
        """`run` split in two: returns a function of no arguments that runs the program compiled
        here, so that a caller can time compilation and running apart."""
        seeds, sweep = self._arguments(seeds, sweep)
        return functools.partial(self._run.lower(seeds, sweep).compile(), seeds, sweep)

    def run(self, seeds, sweep: Mapping[str, Any] | None = None):
        """Runs len(seeds) independent trainings side by side in one compiled program.

        sweep: LossConfig fields (`TRACEABLE_FIELDS`) to one value per run ([len(seeds)]
        arrays, run i with seeds[i]); each value is range-checked first. Returns a dict of
        arrays with a leading run axis: metrics {name: [runs, steps]}, eval_correct [runs,
        evals, N_eval] (evals = 1 + steps / eval_every, the first before training),
        eval_entropy [runs, evals], params and control (the final ones).
        """
        return self._run(*self._arguments(seeds, sweep))
