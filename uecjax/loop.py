"""The RL training loop: collect a rollout batch, update on it, log, evaluate, save.

`build_run` puts the pieces together from the config (policy, trainer, rollout, grader,
records); `train` runs them. docs/DESIGN.md draws the data flow of one step and explains the
multi-host layout: every process runs this same loop over one global mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from uecjax import checkpoint as ckpt
from uecjax.config import ConfigValueError, Derived, derive, validate
from uecjax.data.records import SkipCounter
from uecjax.evaluate import evaluate
from uecjax.metrics import RunLogger
from uecjax.models import save_pretrained
from uecjax.models.lora import lora_spec, zero_adapters
from uecjax.models.peft_export import save_adapter
from uecjax.offload import HostParams
from uecjax.parallel.gather import to_host
from uecjax.parallel.hosts import GlobalPrompts, Hosts
from uecjax.parallel.launch import is_main_process
from uecjax.parallel.mesh import check_batch_size, put_replicated
from uecjax.rewards.grader import make_grader
from uecjax.rollout import Rollout, merge_share_stats
from uecjax.run_state import Pending, RunCheckpoints
from uecjax.sampler import Sampler
from uecjax.setup import Policy, load_policy, make_records, prompt_stream, run_mesh
from uecjax.tokenizer import decode_responses, stop_token_ids
from uecjax.train_step import TrainStep
from uecjax.updates import mean_metrics


@dataclasses.dataclass
class Run:
    """Everything a training run holds between steps, besides the arrays."""

    cfg: ml_collections.ConfigDict
    derived: Derived
    policy: Policy
    hosts: Hosts
    trainer: TrainStep
    sampler: Sampler
    rollout: Rollout
    grader: object  # uecjax.rewards.grader.RewardGrader or CountdownGrader
    eval_records: list
    skipped: SkipCounter  # malformed rows, and prompts too long for the batch
    source_skips: dict  # the malformed rows: every process checked the whole source
    checkpoints: RunCheckpoints


def build_run(cfg: ml_collections.ConfigDict, workdir: str, logger: RunLogger) -> tuple[Run, tuple]:
    """(the run, its initial (params, opt_state, control, ref_params)) from a validated config."""
    mesh = run_mesh(cfg)
    policy = load_policy(cfg, mesh, log=logger.text, workdir=workdir)
    lora = cfg.model.lora.rank > 0  # the base, the vision tower included, is frozen whole
    frozen = ("visual",) if policy.vl_config is not None and cfg.model.freeze_vision and not lora else ()
    derived = derive(cfg, frozen)
    loss_cfg, rollout_cfg, plan = derived.loss_cfg, derived.rollout_cfg, derived.update_plan
    # Each update trains on one mini-batch: a clear error up front if it does not split.
    check_batch_size(rollout_cfg.batch_rows // plan.updates_per_rollout, mesh, cfg.train.micro_batches)
    hosts = Hosts.of_mesh(mesh)  # this process's rows of every batch (docs/DESIGN.md)
    reader, readers = hosts.readers()  # this process's block of the prompts, of `readers`
    if rollout_cfg.prompts_per_batch % readers:
        raise ConfigValueError(
            f"config.rollout.prompts_per_batch={rollout_cfg.prompts_per_batch}: must be a multiple "
            f"of {readers}, the processes holding distinct batch rows (each reads, samples and "
            "grades an equal share of every batch)")
    trainer = TrainStep(policy.model, loss_cfg, derived.optim_cfg, mesh,
                        micro_batches=cfg.train.micro_batches, chunk_size=cfg.train.chunk_size,
                        hosts=hosts, score_rows=rollout_cfg.batch_rows // hosts.count,
                        pack=cfg.train.pack, tokens_per_row=cfg.train.tokens_per_row)
    params, opt_state, control = trainer.init(trainer.trainable(policy.model), seed=cfg.seed)
    ref_params = None
    if loss_cfg.beta > 0 and lora:  # the base with the adapters off: no copy of the weights
        ref_params = HostParams(zero_adapters(params), trainer.param_shardings, offload=False)
    elif loss_cfg.beta > 0:
        # The reference is frozen and every weight is cast to the compute dtype before use, so
        # storing it in that dtype changes no log-prob and halves its memory in bfloat16.
        to_compute = lambda p: jax.tree.map(lambda x: x.astype(cfg.model.dtype), p)  # noqa: E731
        ref_params = HostParams(jax.jit(to_compute, out_shardings=trainer.param_shardings)(params),
                                trainer.param_shardings, offload=cfg.model.offload_reference)

    train_records, train_iter = make_records(cfg, cfg.data.train_split, train=True, shard=(reader, readers))
    skipped = train_records.skipped
    tokenizer = policy.tokenizer
    prompts = prompt_stream(train_iter, tokenizer, cfg, rollout_cfg.max_prompt_len, skipped,
                            policy.image_processor)  # this process's block of every batch
    if hosts.count == 1:  # every process computes every row: all blocks, all-gathered
        prompts = GlobalPrompts(prompts, rollout_cfg.prompts_per_batch, readers)
    if jax.process_count() > 1:
        logger.text(f"{jax.process_count()} processes, {hosts.count} row shares: each samples, "
                    f"grades and trains on {rollout_cfg.batch_rows // hosts.count} of "
                    f"{rollout_cfg.batch_rows} rows per batch")
    # The task's grader: math-verify in worker processes, or the countdown parser in process.
    grader = make_grader(cfg.data.kind, num_workers=cfg.reward.num_workers,
                         timeout_s=cfg.reward.timeout_s, format_weight=cfg.reward.format_weight,
                         think_prefilled=cfg.reward.think_prefilled)
    sampler = Sampler(policy.model, pad_id=tokenizer.pad_token_id or 0, mesh=mesh,
                      batching=cfg.sampler.batching, slots=cfg.sampler.slots or None)
    stops = stop_token_ids(tokenizer)
    rollout = Rollout(rollout_cfg, loss_cfg, sampler=sampler, prompts=prompts,
                      grade=grader.grade_batch,
                      score=functools.partial(trainer.score, ref_params=ref_params),
                      decode=functools.partial(decode_responses, tokenizer, stop_ids=stops),
                      stop_token_ids=stops, seed=cfg.seed, hosts=hosts)
    checkpoints = RunCheckpoints(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                 rollout=rollout, data_iterator=train_iter, hosts=hosts,
                                 updates_per_rollout=plan.total, method=cfg.method,
                                 config_json=cfg.to_json())
    run = Run(cfg, derived, policy, hosts, trainer, sampler, rollout, grader,
              make_records(cfg, cfg.data.eval_split, train=False), skipped, skipped.as_dict(),
              checkpoints)
    return run, (params, opt_state, control)


def run_eval(run: Run, step: int, logger: RunLogger, progress: bool) -> dict:
    """Held-out greedy Pass@1 and sampled Pass@k, logged under eval/."""
    cfg, t = run.cfg, time.perf_counter()
    result = evaluate(run.sampler, run.policy.tokenizer, run.eval_records, run.grader,
                      n=cfg.eval.n, max_new_tokens=cfg.eval.max_new_tokens,
                      temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                      batch_prompts=cfg.eval.batch_prompts,
                      prompt_template=cfg.prompt.template,
                      use_chat_template=cfg.prompt.use_chat_template, seed=cfg.seed,
                      progress=progress, image_processor=run.policy.image_processor,
                      hosts=run.hosts)
    result["time_s"] = time.perf_counter() - t
    logger.scalars(step, result, prefix="eval/")
    logger.text(f"eval @ step {step}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in result.items() if k.startswith(("pass@", "greedy"))))
    return result


def skip_counts(run: Run) -> dict:
    """Skipped rows of the run: the source's once, plus every share's skipped prompts."""
    own = {k: v - run.source_skips.get(k, 0) for k, v in run.skipped.as_dict().items()}
    return merge_share_stats([run.source_skips] + run.hosts.gather(own))


def set_h0(control, roll_stats: dict, trainer: TrainStep):
    """H_0 (section 6) from the first rollout with tokens: the token-mean entropy of the initial
    policy's regular samples before any selection, as the rollout measured them. Once set, it
    is kept (and checkpointed)."""
    if not np.isnan(float(jax.device_get(control.h0))):
        return control
    if roll_stats.get("rollout/regular_tokens", 0.0) <= 0:
        return control  # no token yet: the step keeps it unset too
    h0 = np.float32(roll_stats["rollout/regular_entropy"])
    return put_replicated(control.replace(h0=jax.numpy.asarray(h0)), trainer.replicated)


def host_floats(updates: list) -> list[dict[str, float]]:
    """Per-update metrics as host floats (those restored from a checkpoint already are)."""
    return [u if all(isinstance(v, float) for v in u.values())
            else {k: float(v) for k, v in to_host(u).items()} for u in updates]


def train(cfg: ml_collections.ConfigDict, workdir: str, *, log_console=sys.stdout) -> dict:
    """Runs (or resumes) a training run; returns the closing summary."""
    validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    logger = RunLogger(workdir, enabled=jax.process_index() == 0, console=log_console)
    run, (params, opt_state, control) = build_run(cfg, workdir, logger)
    trainer, rollout, plan = run.trainer, run.rollout, run.derived.update_plan
    start, history, pending = 0, {}, None
    resumed = run.checkpoints.restore(params, opt_state, control, logger.text)
    if resumed is not None:
        params, opt_state, control = resumed.params, resumed.opt_state, resumed.control
        start, history, pending = resumed.step, resumed.history, resumed.pending
        where = (f" (rollout {start + 1}, after update {pending.done} of {plan.total})"
                 if pending else "")
        logger.text(f"resumed from {run.checkpoints.directory} at step {start}{where}")
    nnx.update(run.policy.model, params)  # the sampler reads the model
    evaluate_now = functools.partial(run_eval, run, logger=logger,
                                     progress=log_console is not None and is_main_process())
    restore_handler = ckpt.install_sigterm_handler()
    if "initial" not in history:
        history["initial"] = evaluate_now(0)
    preempted, step = False, cfg.train.steps
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            if pending is None:  # collect: sample, grade and score a batch with the current policy
                rows, roll_stats = rollout.collect(params)
                pending = Pending(rows, roll_stats, 0, [], time.perf_counter() - t0)
                control = set_h0(control, roll_stats, trainer)
            t1 = time.perf_counter()
            # update: mini-batches x epochs (uecjax.updates), pi_old stays the rollout's.
            for k in range(pending.done, plan.total):
                minibatch = pending.rows.select(plan.rows_of(step, k, len(pending.rows), run.hosts.index))
                params, opt_state, control, metrics = trainer.step(params, opt_state, control,
                                                                   trainer.device_batch(minibatch))
                control = trainer.update_control(control, metrics)
                pending.metrics.append(metrics)  # on device: fetched once, after the updates
                pending.done = k + 1
                # Polled after every update (a multi-host sync point needs every update count).
                preempted = ckpt.preemption_requested((step - 1) * plan.total + k + 1)
                if preempted and pending.done < plan.total:
                    break
            if preempted and pending.done < plan.total:
                pending.metrics = host_floats(pending.metrics)
                run.checkpoints.save(step - 1, params, opt_state, control, history,
                                     pending=pending, force=True)
                logger.text(f"preemption: saved rollout step {step}, update {pending.done} of "
                            f"{plan.total}, to {run.checkpoints.directory}; exiting")
                break
            nnx.update(run.policy.model, params)
            rows, roll_stats, t_rollout = pending.rows, pending.roll_stats, pending.t_rollout
            values = mean_metrics(host_floats(pending.metrics))
            values["updates"] = float(len(pending.metrics))
            pending = None
            rollout.remember_for_replay(rows)
            rng = np.random.default_rng((cfg.seed, step) + ((run.hosts.index,) if run.hosts.count > 1 else ()))
            replay = rollout.replay_batch(step, rng, params)  # may rescore with params
            if replay is not None:  # the replay stabilizer's extra update (section 8)
                params, opt_state, control, replay_metrics = trainer.step(
                    params, opt_state, control, trainer.device_batch(replay), advance_schedule=False)
                nnx.update(run.policy.model, params)
                values.update({f"replay/{k}": v for k, v in host_floats([replay_metrics])[0].items()})
            # log
            t_train = time.perf_counter() - t1
            values.update(roll_stats)
            values.update({f"data/{k}": v for k, v in skip_counts(run).items()})
            values.update({"time/rollout": t_rollout, "time/train": t_train,
                           "tokens_per_s": roll_stats.get("sampled_tokens", 0.0) / max(t_rollout + t_train, 1e-9),
                           "pass@1": roll_stats["accuracy"]})
            # evaluate
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                values.update({f"eval/{k}": v for k, v in evaluate_now(step).items()})
            logger.scalars(step, values)
            if step % cfg.train.log_every == 0:
                logger.progress(step, cfg.train.steps, values)
            # save
            if preempted:
                run.checkpoints.save(step, params, opt_state, control, history, force=True)
                logger.text(f"preemption: saved step {step} to {run.checkpoints.directory}; exiting")
                break
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                run.checkpoints.save(step, params, opt_state, control, history)
        if not preempted:
            history["final"] = evaluate_now(step)
            run.checkpoints.save(step, params, opt_state, control, history, force=True)
    finally:
        restore_handler()
        run.checkpoints.close()
        run.grader.close()
        logger.close()
    return _summary(run, workdir, step, preempted, history, logger)


def _summary(run: Run, workdir: str, step: int, preempted: bool, history: dict,
             logger: RunLogger) -> dict:
    """The closing summary; a finished run also exports its policy in Hugging Face layout."""
    summary = {"workdir": workdir, "step": step, "preempted": preempted,
               "tensorboard": logger.tb_dir, "metrics_jsonl": logger.jsonl_path,
               "checkpoints": str(run.checkpoints.directory)}
    if preempted:
        return summary
    if run.cfg.train.export_hf:
        export = os.path.join(workdir, "export")
        save_pretrained(run.policy.model, export)  # every process gathers, process 0 writes
        if is_main_process():
            run.policy.tokenizer.save_pretrained(export)
            if run.policy.image_processor is not None:  # the export loads as it was trained
                run.policy.image_processor.hf.save_pretrained(export)
        summary["export"] = export
    if lora_spec(run.policy.model) is not None:  # the adapters alone, for peft / vLLM
        adapter = os.path.join(workdir, "adapter")
        save_adapter(run.policy.model, adapter, base_model=run.policy.source)
        summary["adapter"] = adapter
    summary.update({f"initial_{k}": v for k, v in history["initial"].items()})
    summary.update({f"final_{k}": v for k, v in history["final"].items()})
    logger.text("")
    logger.text(f"done: {step} steps")
    largest = max(int(k.split("@")[1]) for k in summary if k.startswith("final_pass@"))
    for key in ("greedy_pass@1", "pass@1", f"pass@{largest}"):
        if f"initial_{key}" in summary:
            logger.text(f"  held-out {key}: {summary[f'initial_{key}']:.3f} -> "
                        f"{summary[f'final_{key}']:.3f}")
    for key in ("tensorboard", "metrics_jsonl", "checkpoints", "export", "adapter"):
        if key in summary:
            logger.text(f"  {key}: {summary[key]}")
    return summary
