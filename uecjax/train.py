"""RL training: `python -m uecjax.train --config=configs/demo.py [--config.a.b=v] [--workdir=DIR]`.

One step: rollout (sampler with the current parameters, rewards graded in worker processes
while the trainer scores the responses) -> a fixed-size batch -> the jitted, sharded train
step -> the sampler reads the new parameters. Around it: periodic held-out evaluation
(Pass@k), TensorBoard + JSONL + a console line per step, orbax checkpoints (resume continues
exactly; SIGTERM saves and exits), and the final policy exported in Hugging Face layout.

The checkpoint's config.json decides the model: a Qwen2.5-VL policy samples, scores and trains
on the records' images through this same loop (`configs/geo3k.py`), a text policy on their text.

Multi-process runs (`uecjax.distributed`: TPU slices, SLURM, or --coordinator_address /
--num_processes / --process_id) run this same loop on every process over one global mesh.

Rollouts, per host. `sharding.row_share` finds this process's share of every batch: the rows
its devices hold along data x fsdp, one of `count` equal blocks (count = the process count
on the usual meshes; processes whose devices hold the same rows, e.g. a tensor axis across
hosts, share a block). The training records are one seeded stream, the same on every host:
the source shuffled (reshuffled every epoch) and repeated. Each global batch of
B = rollout.prompts_per_batch consecutive records is cut into `count` blocks (B must divide
evenly), and the process reads, renders and length-checks only its block
(`uecjax.data.shard_batches`, a grain MapDataset view: other blocks are never read). The
rollout (`uecjax.rollout`) then samples, grades, scores and selects that block's rows alone:
each sampler and scoring call is one SPMD program over all devices, into which every process
brings its own block and from which it takes back its own rows (`sharding.share_batch`,
`sharding.share_rows`: no gather across hosts); grading and advantages run where the rows
are; the processes agree on the number of rounds, the exploration batch and replay through
small all-gathers, and their step metrics and `data/skipped*` counts are summed. Each process
gives its B * G / count rows to the global batch of the train step. Without selective rows
(retention, dynamic sampling, exploration) the run equals the one-process run: the blocks in
process order are the one-process batch.

A Qwen2.5-VL policy's rows carry their images: the prompts that enter a sampler call carry
their processed pixels to every process (the call is collective), and the shares agree on one
patch width for the rows' image arrays before scoring and training (an all-gather of a count).
On a mesh where no process holds a block of its own (one share), each process reads its block
of prompts, `run_setup.GlobalPrompts` all-gathers the rendered prompts, and every process
computes every row.

Each process's grain iterator has its own state: a checkpoint's meta holds `data_iterator`
(process 0's) and, in multi-process runs, `data_iterators`, every process's state in process
order; rows that a share keeps for a later step are saved per share (`buffer_<b>`,
`replay_<b>`). On resume each process restores its own. Resuming needs the same process count
(and prompts_per_batch) as the run that saved; a checkpoint with a single state resumes on
one process only. Process 0 writes the logs and the export; every process takes part in
checkpoint saves (orbax writes each array shard once, from the process that holds it) and in
gathers of sharded arrays.

`--dry_run` builds the model abstractly (no weights), compiles the train step for the
configured batch on the configured mesh and prints what it needs per device
(`uecjax.dry_run`).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from uecjax import checkpoint as ckpt
from uecjax import cli
from uecjax.config import ConfigValueError, validate
from uecjax.evaluate import evaluate
from uecjax.metrics import RunLogger
from uecjax.data import DataNotFoundError
from uecjax.models import CheckpointError, ConfigError, VLConfig, save_pretrained
from uecjax.offload import HostParams
from uecjax.objectives.loss_config import LossConfigError
from uecjax.objectives.methods import loss_config
from uecjax.optim import OptimConfig, OptimConfigError
from uecjax.rewards import make_grader
from uecjax.rollout import Rollout, merge_share_stats, rollout_config
from uecjax.parallel import launch
from uecjax.parallel.hosts import GlobalPrompts, Hosts, is_main_process, to_host
from uecjax.parallel.mesh import ShardingError, check_batch_size, put_replicated
from uecjax.run_setup import (image_processor, iterator_states, load_policy, make_records,
                              own_iterator_state, prompt_stream, run_mesh)
from uecjax.sampler import Sampler
from uecjax.tokenizer import TokenizerError, decode_responses, stop_token_ids
from uecjax.train_step import TrainStep
from uecjax.rows import RowBuffer
from uecjax.updates import UpdatePlan, mean_metrics
from uecjax.vision_inputs import VisionInputError


def _host(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in to_host(metrics).items()}


def _hosted(updates: list) -> list[dict[str, float]]:
    """Per-update metrics as host floats (those restored from a checkpoint already are)."""
    return [u if all(isinstance(v, float) for v in u.values()) else _host(u) for u in updates]


def _set_h0(control, roll_stats: dict, trainer: TrainStep):
    """H_0 (section 6) from the first rollout with tokens: the token-mean entropy of the initial
    policy's regular samples before any selection (retention, exploration), as the rollout
    measured them. Once set, it is kept (and checkpointed)."""
    if not np.isnan(float(jax.device_get(control.h0))):
        return control
    if roll_stats.get("rollout/regular_tokens", 0.0) <= 0:
        return control  # no token yet: the step keeps it unset too
    h0 = np.float32(roll_stats["rollout/regular_entropy"])
    return put_replicated(control.replace(h0=jax.numpy.asarray(h0)), trainer.replicated)


def train(cfg: ml_collections.ConfigDict, workdir: str, *, log_console=sys.stdout) -> dict:
    """Runs (or resumes) a training run; returns the closing summary."""
    validate(cfg)
    os.makedirs(workdir, exist_ok=True)
    logger = RunLogger(workdir, enabled=jax.process_index() == 0, console=log_console)
    mesh = run_mesh(cfg)
    model, tokenizer = load_policy(cfg, workdir, mesh, logger)
    stops = stop_token_ids(tokenizer)
    # A Qwen2.5-VL policy gets images; a text policy the prompts' text alone. One loop for both.
    vl_config = model.config if isinstance(model.config, VLConfig) else None
    processor = image_processor(cfg, model)

    hp = loss_config(cfg.method, **cfg.loss.to_dict())
    rcfg = rollout_config(cfg.method, **cfg.rollout.to_dict())
    frozen = ("visual",) if vl_config is not None and cfg.model.freeze_vision else ()
    plan = UpdatePlan(cfg.train.updates_per_rollout, cfg.train.epochs, cfg.seed)
    # The schedule counts optimizer updates on fresh rollouts (replay updates do not advance it).
    scheduled = cfg.train.steps * plan.total
    optim = OptimConfig(**{"total_steps": max(scheduled, cfg.optim.warmup_steps + 1),
                           **cfg.optim.to_dict(), "frozen": frozen})
    # Each update trains on one mini-batch: a clear error up front if it does not split.
    check_batch_size(rcfg.batch_rows // plan.updates_per_rollout, mesh, cfg.train.micro_batches)
    # This process's rows of every batch (module docstring).
    hosts = Hosts.of_mesh(mesh)
    block = hosts.readers()
    if rcfg.prompts_per_batch % block[1]:
        raise ConfigValueError(
            f"config.rollout.prompts_per_batch={rcfg.prompts_per_batch}: must be a multiple of "
            f"{block[1]}, the processes holding distinct batch rows (each reads, samples and "
            "grades an equal share of every batch)")
    trainer = TrainStep(model, hp, optim, mesh, micro_batches=cfg.train.micro_batches,
                        chunk_size=cfg.train.chunk_size, hosts=hosts,
                        score_rows=rcfg.batch_rows // hosts.count)
    params, opt_state, control = trainer.init(nnx.state(model), seed=cfg.seed)
    ref_params = None
    if hp.beta > 0:
        # The reference is frozen and every weight is cast to the compute dtype before use, so
        # storing it in that dtype changes no log-prob and halves its memory in bfloat16.
        to_compute = lambda p: jax.tree.map(lambda x: x.astype(cfg.model.dtype), p)  # noqa: E731
        ref_params = HostParams(jax.jit(to_compute, out_shardings=trainer.param_shardings)(params),
                                trainer.param_shardings, offload=cfg.model.offload_reference)
    train_records, train_iter = make_records(cfg, cfg.data.train_split, train=True, shard=block)
    eval_records = make_records(cfg, cfg.data.eval_split, train=False)
    skipped = train_records.skipped  # malformed rows, and prompts too long for the batch
    # This process's block of every batch; with one share, all processes' blocks.
    prompts = prompt_stream(train_iter, tokenizer, cfg, rcfg.max_prompt_len, skipped, processor)
    if hosts.count == 1:
        prompts = GlobalPrompts(prompts, rcfg.prompts_per_batch, block[1])
    if jax.process_count() > 1:
        logger.text(f"{jax.process_count()} processes, {hosts.count} row shares: each samples, "
                    f"grades and trains on {rcfg.batch_rows // hosts.count} of {rcfg.batch_rows} "
                    "rows per batch")
    source_skips = skipped.as_dict()  # malformed rows: every process checked the whole source

    def skip_counts() -> dict:
        """Skipped rows of the run: the source's once, plus every share's skipped prompts."""
        own = {k: v - source_skips.get(k, 0) for k, v in skipped.as_dict().items()}
        return merge_share_stats([source_skips] + hosts.gather(own))
    # The task's grader: math-verify in worker processes, or the countdown parser in process.
    grader = make_grader(cfg.data.kind, num_workers=cfg.reward.num_workers,
                         timeout_s=cfg.reward.timeout_s, format_weight=cfg.reward.format_weight,
                         think_prefilled=cfg.reward.think_prefilled)
    # Rows split over the mesh's data x fsdp devices, as the train step's batches.
    sampler = Sampler(model, pad_id=tokenizer.pad_token_id or 0, mesh=mesh)
    rollout = Rollout(rcfg, hp, sampler=sampler, prompts=prompts, grade=grader.grade_batch,
                      score=functools.partial(trainer.score, ref_params=ref_params),
                      decode=functools.partial(decode_responses, tokenizer, stop_ids=stops),
                      stop_token_ids=stops, seed=cfg.seed, hosts=hosts)

    def run_eval(step: int) -> dict:
        t = time.perf_counter()
        result = evaluate(sampler, tokenizer, eval_records, grader, n=cfg.eval.n,
                          max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                          batch_prompts=cfg.eval.batch_prompts, prompt_template=cfg.prompt.template,
                          use_chat_template=cfg.prompt.use_chat_template, seed=cfg.seed,
                          progress=log_console is not None and is_main_process(),
                          image_processor=processor, hosts=hosts)
        result["time_s"] = time.perf_counter() - t
        logger.scalars(step, result, prefix="eval/")
        logger.text(f"eval @ step {step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in result.items() if k.startswith(("pass@", "greedy"))))
        return result

    checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=cfg.train.keep_checkpoints)
    start, history, pending = 0, {}, None
    suffix = f"_{hosts.index}" if hosts.count > 1 else ""
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(
            params_target=ckpt.abstract_like(params), opt_state_target=ckpt.abstract_like(opt_state),
            control_target=ckpt.abstract_like(control))
        params, opt_state, control = restored["params"], restored["opt_state"], restored["control"]
        meta = restored["meta"]
        for skipped_step, why in restored.get("skipped", []):
            logger.text(f"checkpoint {skipped_step} does not restore ({why}); using an older one")
        start, history = meta["step"], meta["history"]
        train_iter.set_state(own_iterator_state(meta, jax.process_index(), jax.process_count()))
        rollout.calls = meta["rollout_calls"]
        buffers = restored["buffers"] or {}
        rollout.buffer.load(buffers.get("buffer" + suffix))
        rollout.replay.load(buffers.get("replay" + suffix))
        if meta.get("pending"):  # saved between two updates of rollout step start + 1
            held = RowBuffer()
            held.load(buffers.get("pending" + suffix))
            pending = dict(meta["pending"], rows=held.rows)
        where = f" (rollout {start + 1}, after update {pending['done']} of {plan.total})" if pending else ""
        logger.text(f"resumed from {checkpointer.directory} at step {start}{where}")
    nnx.update(model, params)

    def save(step: int, force: bool = False, pending: dict | None = None) -> None:
        """Checkpoint after `step` rollouts, or inside rollout step + 1 with `pending` (its rows,
        rollout metrics and the updates done so far). Checkpoints are numbered by scheduled
        updates (= rollout steps when each rollout gives one update)."""
        # Rows kept for later steps: every share's (all-gathered; a collective with several).
        held_rows = None
        if pending is not None:
            held = RowBuffer()
            held.push(pending["rows"])
            held_rows = held.state()
        buffers = {}
        for b, held in enumerate(hosts.gather((rollout.buffer.state(), rollout.replay.state(), held_rows))):
            name_suffix = f"_{b}" if hosts.count > 1 else ""
            for name, state in zip(("buffer", "replay", "pending"), held):
                if state is not None:
                    buffers[name + name_suffix] = state
        states = iterator_states(train_iter.get_state())  # a collective with several processes
        meta = dict(step=step, history=history, data_iterator=states[0],
                    rollout_calls=rollout.calls, method=cfg.method, config=cfg.to_json())
        if len(states) > 1:
            meta["data_iterators"] = states
        done = 0
        if pending is not None:
            done = pending["done"]
            meta["pending"] = {k: pending[k] for k in ("done", "roll_stats", "metrics", "t_rollout")}
        checkpointer.save(step * plan.total + done, params=params, opt_state=opt_state,
                          control=control, meta=meta, buffers=buffers or None, force=force)

    restore_handler = ckpt.install_sigterm_handler()
    if "initial" not in history:
        history["initial"] = run_eval(0)
    preempted = False
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            if pending is not None:  # resumed between two updates of this rollout
                rows, roll_stats, done = pending["rows"], pending["roll_stats"], pending["done"]
                updates, t_rollout = pending["metrics"], pending["t_rollout"]
                pending = None
            else:
                rows, roll_stats = rollout.collect(params)
                done, updates, t_rollout = 0, [], time.perf_counter() - t0
                control = _set_h0(control, roll_stats, trainer)
            t1 = time.perf_counter()
            stop = False
            # The rollout batch's updates: mini-batches x epochs (uecjax.updates), each a full
            # train step on its own rows; pi_old stays the rollout's.
            for k in range(done, plan.total):
                minibatch = rows.select(plan.rows_of(step, k, len(rows), hosts.index))
                params, opt_state, control, metrics = trainer.step(params, opt_state, control,
                                                                   trainer.device_batch(minibatch))
                control = trainer.update_control(control, metrics)
                updates.append(metrics)  # on device: fetched once, after the rollout's updates
                # Polled after every update (a multi-host sync point needs every update count).
                stop = ckpt.preemption_requested((step - 1) * plan.total + k + 1)
                if stop and k + 1 < plan.total:
                    break
            if stop and k + 1 < plan.total:
                save(step - 1, force=True, pending=dict(rows=rows, roll_stats=roll_stats, done=k + 1,
                                                        metrics=_hosted(updates), t_rollout=t_rollout))
                preempted = True
                logger.text(f"preemption: saved rollout step {step}, update {k + 1} of {plan.total}, "
                            f"to {checkpointer.directory}; exiting")
                break
            nnx.update(model, params)
            rollout.remember_for_replay(rows)
            values = mean_metrics(_hosted(updates))
            values["updates"] = float(len(updates))
            rng = np.random.default_rng((cfg.seed, step) + ((hosts.index,) if hosts.count > 1 else ()))
            replay = rollout.replay_batch(step, rng, params)  # may rescore with params
            if replay is not None:  # the replay stabilizer's extra update (section 8)
                params, opt_state, control, replay_metrics = trainer.step(
                    params, opt_state, control, trainer.device_batch(replay), advance_schedule=False)
                nnx.update(model, params)
                values.update({f"replay/{k}": v for k, v in _host(replay_metrics).items()})
            t2 = time.perf_counter()
            values.update(roll_stats)
            values.update({f"data/{k}": v for k, v in skip_counts().items()})
            t_step = t_rollout + (t2 - t1)
            values.update({"time/rollout": t_rollout, "time/train": t2 - t1,
                           "tokens_per_s": roll_stats.get("sampled_tokens", 0.0) / max(t_step, 1e-9),
                           "pass@1": roll_stats["accuracy"]})
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                values.update({f"eval/{k}": v for k, v in run_eval(step).items()})
            logger.scalars(step, values)
            if step % cfg.train.log_every == 0:
                logger.progress(step, cfg.train.steps, values)
            if stop:
                save(step, force=True)
                preempted = True
                logger.text(f"preemption: saved step {step} to {checkpointer.directory}; exiting")
                break
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                save(step)
        else:
            step = cfg.train.steps
        if not preempted:
            history["final"] = run_eval(step)
            save(step, force=True)
    finally:
        restore_handler()
        checkpointer.wait()
        checkpointer.close()
        grader.close()
        logger.close()

    summary = {"workdir": workdir, "step": step, "preempted": preempted,
               "tensorboard": logger.tb_dir, "metrics_jsonl": logger.jsonl_path,
               "checkpoints": str(checkpointer.directory)}
    if not preempted:
        export = os.path.join(workdir, "export")
        if cfg.train.export_hf:
            save_pretrained(model, export)  # every process gathers, process 0 writes
            if is_main_process():
                tokenizer.save_pretrained(export)
                if processor is not None:  # preprocessor_config.json: the export loads as it was
                    processor.hf.save_pretrained(export)
            summary["export"] = export
        summary.update({f"initial_{k}": v for k, v in history["initial"].items()})
        summary.update({f"final_{k}": v for k, v in history["final"].items()})
        _print_summary(summary, logger)
    return summary


def _print_summary(s: dict, logger: RunLogger) -> None:
    logger.text("")
    logger.text(f"done: {s['step']} steps")
    for key in ("greedy_pass@1", "pass@1", f"pass@{max(int(k.split('@')[1]) for k in s if k.startswith('final_pass@'))}"):
        if f"initial_{key}" in s:
            logger.text(f"  held-out {key}: {s[f'initial_{key}']:.3f} -> {s[f'final_{key}']:.3f}")
    for key in ("tensorboard", "metrics_jsonl", "checkpoints", "export"):
        if key in s:
            logger.text(f"  {key}: {s[key]}")


# Errors that mean a user mistake (bad config value, missing data or checkpoint, a checkpoint
# that does not match): printed as one message, no traceback.
USER_ERRORS = (ConfigValueError, LossConfigError, OptimConfigError, ConfigError, CheckpointError,
               DataNotFoundError, TokenizerError, ckpt.CheckpointNotFoundError,
               ckpt.CheckpointMismatchError, ShardingError, VisionInputError,
               launch.DistributedError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (logs, checkpoints, export). "
                    "Default: runs/<config name>-<method>.")
flags.DEFINE_bool("dry_run", False, "Build the model abstractly, compile the train step for the "
                  "configured batch and mesh, print the memory it needs per device; no weights, "
                  "no data. The shape comes from config.model.preset or config.model.path.")
flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: compile for this many simulated CPU "
                     "devices (e.g. a pod's device count) instead of the machine's devices.")
launch.define_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # the libraries' INFO lines would bury the progress
    cfg = FLAGS.config  # cli.config_flags_parser has loaded it (or exited)
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = FLAGS.workdir or os.path.join("runs", f"{name}-{cfg.method}")
    try:
        # Config mistakes surface here, before distributed setup or any model is built.
        validate(cfg, dry_run=FLAGS.dry_run)
        if FLAGS.dry_run:
            from uecjax.dry_run import dry_run, simulate_cpu_devices

            if FLAGS.dry_run_devices:
                simulate_cpu_devices(FLAGS.dry_run_devices)
            dry_run(cfg)
            return
        if FLAGS.dry_run_devices:
            raise ConfigValueError("--dry_run_devices needs --dry_run")
        launch.initialize_from_flags()  # before anything touches a device
        train(cfg, workdir)
    except USER_ERRORS as e:
        # User mistakes (bad values, missing data or checkpoints): the message, no traceback.
        cli.fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser())
