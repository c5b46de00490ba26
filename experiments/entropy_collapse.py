"""Entropy collapse on the countdown task: every method x 5 seeds, each method one compiled program.

    python experiments/entropy_collapse.py                     # the committed run
    python experiments/entropy_collapse.py --methods=grpo,uec --seeds=2 --steps=50 --out=/tmp/ec

Every run starts from the same warmed-up countdown policy (`uecjax.countdown_model`, prepared
once) and trains with `uecjax.testbed.CompiledLoop`: sampling, the jnp reward, advantages,
exploration and the library's train step inside one jit, vmapped over the seeds. Held-out
problems are evaluated inside the program every --eval_every steps with --eval_samples samples
each (unbiased Pass@k for every k up to it).

Writes to --out (default experiments/results/entropy/):
    runs/<variant>.npz        per-step metrics [seeds, steps], held-out correct counts
                              [seeds, evals, prompts], held-out entropy [seeds, evals]
    results.json, results.md  final figures with 95% bootstrap intervals over seeds, the
                              entropy-performance fit per method, the warm-up policy's
                              figures, timings and the host-loop speed comparison
    curves.png                entropy, reward, held-out Pass@1 / Pass@64, hard problems solved
    pass_at_k.png             Pass@k against k at the end, against the warm-up policy
    entropy_law.png           held-out Pass@1 against entropy with each method's fit

A finished variant (its npz exists with the same settings) is not run again.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# variant: (method, LossConfig overrides, LoopConfig overrides). The UEC ablations switch one
# component off: the difficulty gate (exploration bonus on every prompt), the stabilizer, the
# section-8 rollout exploration.
VARIANTS = {
    "grpo": ("grpo", {}, {}),
    "dapo": ("dapo", {}, {}),
    "entropy_reg": ("entropy_reg", {}, {}),
    "clip_cov": ("clip_cov", {}, {}),
    "kl_cov": ("kl_cov", {}, {}),
    "aer": ("aer", {}, {}),
    "uec": ("uec", {}, {}),
    "uec-no_gate": ("uec", dict(gate="hard", gate_tau=1.0), {}),
    "uec-no_stabilizer": ("uec", dict(stabilizer=False), {}),
    "uec-no_rollout_explore": ("uec", {}, dict(explore=False)),
}
PASS_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# --sweep: every swept variant gets the same budget, four values of its own main coefficient
# (a LossConfig field the compiled loop can trace) times --sweep_seeds seeds, in one program.
SWEEPS = {
    "grpo": ("eps_high", (0.2, 0.24, 0.28, 0.32)),
    "entropy_reg": ("entropy_coef", (0.001, 0.003, 0.01, 0.03)),
    "kl_cov": ("kl_cov_coef", (0.3, 1.0, 3.0, 10.0)),
    "aer": ("aer_rho", (0.4, 0.6, 0.8, 1.0)),
    "uec": ("alpha", (0.01, 0.03, 0.1, 0.3)),
}

# Own flag registry, so that importing this module next to another experiment's (the tests do)
# cannot clash with its flags of the same names.
FLAGS = flags.FlagValues()


class _Define:
    """absl's DEFINE_* functions bound to FLAGS."""

    def __getattr__(self, name):
        return functools.partial(getattr(flags, name), flag_values=FLAGS)


_define = _Define()
_define.DEFINE_list("methods", list(VARIANTS), f"Variants, from {list(VARIANTS)}.")
_define.DEFINE_integer("seeds", 5, "Seeds per variant (0 .. seeds-1), vmapped in one program.")
_define.DEFINE_integer("steps", 200, "RL steps (rollouts) per run.")
_define.DEFINE_integer("eval_every", 25, "Held-out evaluation interval in steps.")
_define.DEFINE_integer("eval_samples", 256, "Samples per held-out problem.")
_define.DEFINE_integer("eval_per_level", 32, "Held-out problems per difficulty level.")
_define.DEFINE_integer("host_steps", 6, "Steps of `python -m uecjax.train` for the speed "
                     "comparison (0: skip it).")
_define.DEFINE_integer("sft_steps", 1000, "Supervised warm-up steps of the initial policy.")
_define.DEFINE_bool("sweep", False, f"Instead of the comparison, the same-budget sweep of {list(SWEEPS)} "
                  "(OUT/sweep.md).")
_define.DEFINE_integer("sweep_seeds", 2, "Seeds per swept value.")
_define.DEFINE_string("out", os.path.join(HERE, "results", "entropy"), "Output directory.")
_define.DEFINE_string("workdir", "", "Where the warm-up policy is cached (default OUT/work).")

# The task and training settings every variant shares (the method's presets apply on top).
TRAIN = dict(prompts_per_step=16, group_size=8, max_new_tokens=10, updates_per_rollout=2,
             explore_prompts=4, explore_samples=8)
_define.DEFINE_float("learning_rate", 6e-4, "Peak learning rate of every variant.")
_define.DEFINE_integer("warmup_steps", 10, "Linear learning-rate warm-up (optimizer updates): "
                     "Adam's first steps are sign steps of size lr on every parameter.")
_define.DEFINE_float("correct_fraction", 1.0, "Warm-up policy: share of level-1 targets that are "
                   "correct solutions (the rest are random attempts).")


def bootstrap_ci(values, num: int = 2000, seed: int = 0):
    """(mean, low, high): the seed mean and its 95% bootstrap interval (resampling seeds)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (num, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fit_entropy_law(h, r):
    """Least-squares R = -a exp(H) + b (Cui et al., arXiv 2505.22617): a, b, rmse, ceiling b - a."""
    h, r = np.ravel(h), np.ravel(r)
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    rmse = float(np.sqrt(np.mean((design @ np.array([a, b]) - r) ** 2)))
    return dict(a=float(a), b=float(b), rmse=rmse, ceiling=float(b - a))


def task_arrays(records, tokenizer):
    """Countdown records as the compiled loop's TaskArrays (left-padded prompts, numbers)."""
    import jax.numpy as jnp

    from uecjax.testbed.loop import TaskArrays
    from uecjax.tokenizer import render_prompt

    prompts = [render_prompt(tokenizer, r.prompt, template="plain", use_chat_template=False)
               for r in records]
    width = max(map(len, prompts))
    tokens = np.full((len(records), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(records), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
    k = max(len(r.meta["numbers"]) for r in records)
    numbers = np.zeros((len(records), k), np.int32)
    for i, r in enumerate(records):
        numbers[i, :len(r.meta["numbers"])] = r.meta["numbers"]
    count = np.array([len(r.meta["numbers"]) for r in records], np.int32)
    target = np.array([r.meta["target"] for r in records], np.int32)
    level = np.array([r.meta["level"] for r in records], np.int32)
    return TaskArrays(jnp.asarray(tokens), jnp.asarray(mask),
                      (jnp.asarray(numbers), jnp.asarray(count), jnp.asarray(target)),
                      jnp.asarray(level))


def run_variant(name, model, tokenizer, train, heldout, settings, sweep=None):
    """One variant's runs in one compiled program: settings["seeds"] seeds, or with sweep =
    (field, values) every value with every seed (run i: value i // seeds, seed i % seeds)."""
    import jax
    import jax.numpy as jnp

    from uecjax.objectives import loss_config
    from uecjax.optim import OptimConfig
    from uecjax.testbed.countdown_reward import countdown_accuracy_jnp, token_classes
    from uecjax.testbed.loop import CompiledLoop, loop_config
    from uecjax.tokenizer import stop_token_ids

    method, loss_overrides, loop_overrides = VARIANTS[name]
    classes = jnp.asarray(token_classes(tokenizer))

    def reward(tokens, mask, numbers, count, target):
        return countdown_accuracy_jnp(tokens, mask, numbers, count, target, classes)

    loss_cfg = loss_config(method, **loss_overrides)
    cfg = loop_config(method, **{**TRAIN, **loop_overrides}, steps=settings["steps"],
                      eval_every=settings["eval_every"], eval_samples=settings["eval_samples"],
                      eval_chunk=8, stop_token_ids=stop_token_ids(tokenizer),
                      pad_id=tokenizer.pad_token_id)
    optim = OptimConfig(learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                        weight_decay=0.0, eps=1e-6)
    loop = CompiledLoop(model, train, heldout, reward, cfg, loss_cfg, optim)
    seeds = np.arange(settings["seeds"], dtype=np.int32)
    values = {}
    if sweep:
        field, grid = sweep
        values = {field: np.repeat(np.asarray(grid, np.float32), len(seeds))}
        seeds = np.tile(seeds, len(grid))
    start = time.perf_counter()
    program = loop.compile(seeds, values)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(program())
    run_s = time.perf_counter() - start
    metrics = {k: np.asarray(v) for k, v in out["metrics"].items()}
    return dict(metrics=metrics, eval_correct=np.asarray(out["eval_correct"]),
                eval_entropy=np.asarray(out["eval_entropy"]), compile_s=compile_s, run_s=run_s)


def host_loop_speed(workdir, steps):
    """Seconds per step of `python -m uecjax.train` on the countdown config (same batch shape),
    from the run's own per-step timing (rollout + updates), the first step (compilation)
    excluded."""
    run_dir = os.path.join(workdir, "host_run")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed finished one
    cmd = [sys.executable, "-m", "uecjax.train", "--config=configs/countdown.py",
           f"--workdir={run_dir}", f"--config.train.steps={steps}",
           "--config.train.eval_every=0", "--config.train.checkpoint_every=0",
           f"--config.rollout.prompts_per_batch={TRAIN['prompts_per_step']}",
           f"--config.rollout.group_size={TRAIN['group_size']}",
           f"--config.rollout.max_new_tokens={TRAIN['max_new_tokens']}",
           f"--config.train.updates_per_rollout={TRAIN['updates_per_rollout']}",
           "--config.method=grpo"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=os.path.dirname(HERE), check=True, capture_output=True, text=True)
    total = time.perf_counter() - start
    times = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "time/rollout" in row:
                times.append(row["time/rollout"] + row["time/train"])
    per_step = float(np.mean(times[1:])) if len(times) > 1 else total / steps
    return dict(steps=steps, seconds_per_step=per_step, wall_s=total, command=" ".join(cmd[1:]))


def summarize(name, run, levels):
    """Final figures with intervals, curves, and the entropy-law fit of one variant."""
    from uecjax.metrics import pass_at_k_counts

    n = FLAGS.eval_samples
    ks = [k for k in PASS_KS if k <= n]
    pk = pass_at_k_counts(run["eval_correct"], n, ks)  # [seeds, evals, prompts, ks]
    hard = levels == levels.max()
    curves = {
        "entropy": run["metrics"]["entropy"], "reward": run["metrics"]["reward"],
        "pass@1": pk[..., 0].mean(axis=2),
        f"pass@{min(64, n)}": pk[..., ks.index(min(64, n))].mean(axis=2),
        "hard_solved": (run["eval_correct"][:, :, hard] > 0).mean(axis=2),
        "eval_entropy": run["eval_entropy"],
    }
    final = {
        "pass@1": pk[:, -1, :, 0].mean(axis=1),
        f"pass@{min(64, n)}": pk[:, -1, :, ks.index(min(64, n))].mean(axis=1),
        f"pass@{n}": pk[:, -1, :, -1].mean(axis=1),
        "hard_solved": curves["hard_solved"][:, -1],
        "entropy": run["metrics"]["entropy"][:, -10:].mean(axis=1),
        "entropy_drop": 1.0 - run["metrics"]["entropy"][:, -10:].mean(axis=1)
                        / run["metrics"]["entropy"][:, :5].mean(axis=1),
        "reward": run["metrics"]["reward"][:, -10:].mean(axis=1),
    }
    law = fit_entropy_law(run["eval_entropy"], curves["pass@1"])
    law["observed_final_pass@1"] = float(final["pass@1"].mean())
    return dict(
        final={k: bootstrap_ci(v) for k, v in final.items()},
        final_per_seed={k: v.tolist() for k, v in final.items()},
        pass_at_k_end=dict(zip(map(str, ks), pk[:, -1].mean(axis=1).mean(axis=0).tolist())),
        pass_at_k_start=dict(zip(map(str, ks), pk[:, 0].mean(axis=1).mean(axis=0).tolist())),
        curves=curves, law=law, ks=ks)


def warmup_figures(runs, levels):
    """The warm-up policy measured on the held-out problems (the step-0 evaluations of every
    run: the same policy, each run its own samples)."""
    from uecjax.metrics import pass_at_k_counts

    n = FLAGS.eval_samples
    first = np.concatenate([r["eval_correct"][:, 0] for r in runs], axis=0)  # [runs, prompts]
    entropy = np.concatenate([r["eval_entropy"][:, 0] for r in runs])
    p1 = pass_at_k_counts(first, n, [1])[..., 0]
    p8 = pass_at_k_counts(first, n, [min(8, n)])[..., 0]
    # "Pass@8 = 0 but Pass@256 > 0": 8 of the 256 samples miss while some of the 256 hit. Over
    # the choice of which 8, the chance that 8 miss is 1 - Pass@8 (the unbiased estimator), so
    # this is the expected fraction of problems hard at 8 samples and reachable at 256.
    hard_reachable = (1.0 - p8) * (first > 0)
    return {
        "response_entropy_nats": float(entropy.mean()),
        "sampled_pass@1": float(p1.mean()),
        "pass@1_by_level": {int(lv): float(p1[:, levels == lv].mean()) for lv in np.unique(levels)},
        "hard_but_reachable_fraction": float(hard_reachable.mean()),
        "pass@256_zero_fraction": float((first == 0).mean()),
    }


def _band(ax, x, values, label):
    mean = values.mean(axis=0)
    rng = np.random.default_rng(0)
    boots = values[rng.integers(0, len(values), (1000, len(values)))].mean(axis=1)
    lo, hi = np.percentile(boots, 2.5, axis=0), np.percentile(boots, 97.5, axis=0)
    line, = ax.plot(x, mean, label=label, lw=1.4)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)


def plot(summaries, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    some = next(iter(summaries.values()))
    steps = some["curves"]["entropy"].shape[1]
    evals = np.arange(some["curves"]["pass@1"].shape[1]) * FLAGS.eval_every
    k64 = f"pass@{min(64, FLAGS.eval_samples)}"
    panels = [("entropy", "response-token entropy (nats)", np.arange(1, steps + 1)),
              ("reward", "train reward (accuracy)", np.arange(1, steps + 1)),
              ("pass@1", "held-out Pass@1", evals), (k64, f"held-out {k64.capitalize()}", evals),
              ("hard_solved", "hard held-out problems solved (Pass@256 > 0)", evals)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    for ax, (key, title, x) in zip(axes, panels):
        for name, s in summaries.items():
            values, xs = s["curves"][key], x
            if values.shape[1] == steps and steps > 20:  # per-step curves: mean of 5 steps
                kernel = np.ones(5) / 5
                values = np.stack([np.convolve(v, kernel, mode="valid") for v in values])
                xs = x[2:-2]
            _band(ax, xs, values, name)
        ax.set_title(title)
        ax.set_xlabel("step")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ks = some["ks"]
    ax.plot(ks, [some["pass_at_k_start"][str(k)] for k in ks], "k--", label="warm-up policy")
    for name, s in summaries.items():
        ax.plot(ks, [s["pass_at_k_end"][str(k)] for k in ks], marker=".", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("held-out Pass@k")
    ax.set_title(f"Pass@k after {steps} steps (seed mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pass_at_k.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, s in summaries.items():
        h, r = s["curves"]["eval_entropy"], s["curves"]["pass@1"]
        dots = ax.scatter(h.ravel(), r.ravel(), s=8, alpha=0.5)
        grid = np.linspace(h.min(), h.max(), 50)
        law = s["law"]
        ax.plot(grid, -law["a"] * np.exp(grid) + law["b"], color=dots.get_facecolor()[0], label=name)
    ax.set_xlabel("held-out response-token entropy (nats)")
    ax.set_ylabel("held-out Pass@1")
    ax.set_title("R = -a exp(H) + b per method")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "entropy_law.png"), dpi=110)
    plt.close(fig)


def _fmt(ci):
    mean, lo, hi = ci
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def report(summaries, warmup, timing, host, out):
    n = FLAGS.eval_samples
    k64 = f"pass@{min(64, n)}"
    cols = ["pass@1", k64, f"pass@{n}", "hard_solved", "entropy", "entropy_drop", "reward"]
    lines = [
        "# Entropy collapse on countdown: results",
        "",
        f"Command: `python experiments/entropy_collapse.py` ({FLAGS.seeds} seeds, {FLAGS.steps} "
        f"steps, held-out evaluation every {FLAGS.eval_every} steps with {n} samples per problem).",
        "Figures: seed mean and 95% bootstrap interval over seeds. `entropy`: mean response-token "
        "entropy of the last 10 steps' samples; `entropy_drop`: 1 - that / the first 5 steps'; "
        "`hard_solved`: held-out hardest-level problems with a correct sample among the "
        f"{n}; `reward`: train accuracy of the last 10 steps.",
        "",
        "## Warm-up policy (held-out)",
        "",
        "| figure | value |", "|---|---|",
        *[f"| {k} | {json.dumps(v) if isinstance(v, dict) else f'{v:.3f}'} |" for k, v in warmup.items()],
        "",
        "## Final figures",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, s in summaries.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(s["final"][c]) for c in cols) + " |")
    lines += ["", "## Entropy-performance law R = -a exp(H) + b (held-out Pass@1 against held-out "
              "entropy, every evaluation of every seed)", "",
              "| variant | a | b | rmse | predicted ceiling b - a | observed final Pass@1 |",
              "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        law = s["law"]
        lines.append(f"| {name} | {law['a']:.3f} | {law['b']:.3f} | {law['rmse']:.3f} | "
                     f"{law['ceiling']:.3f} | {law['observed_final_pass@1']:.3f} |")
    lines += ["", "## Differences from GRPO (per-seed final values; interval of the difference "
              "of seed means)", ""]
    if "grpo" in summaries:
        base = summaries["grpo"]["final_per_seed"]
        lines += ["| variant | " + " | ".join(cols[:4]) + " |", "|---" * 5 + "|"]
        rng = np.random.default_rng(1)
        for name, s in summaries.items():
            if name == "grpo":
                continue
            cells = []
            for c in cols[:4]:
                a, b = np.asarray(s["final_per_seed"][c]), np.asarray(base[c])
                diffs = (a[rng.integers(0, len(a), (2000, len(a)))].mean(1)
                         - b[rng.integers(0, len(b), (2000, len(b)))].mean(1))
                lo, hi = np.percentile(diffs, [2.5, 97.5])
                verdict = "no difference" if lo <= 0 <= hi else ("higher" if lo > 0 else "lower")
                cells.append(f"{a.mean() - b.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Time", "", "| variant | compile s | run s | steps/s per seed |", "|---|---|---|---|"]
    for name, t in timing.items():
        lines.append(f"| {name} | {t['compile_s']:.0f} | {t['run_s']:.0f} | "
                     f"{FLAGS.steps * FLAGS.seeds / t['run_s']:.2f} |")
    if host:
        lines += ["", f"Host loop (`python -m uecjax.train`, same batch shape, grpo, no evaluation): "
                  f"{host['seconds_per_step']:.2f} s per step = {1 / host['seconds_per_step']:.2f} "
                  f"steps/s; command `{host['command']}`."]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def sweep_main(model, tokenizer, train, heldout, levels, settings, out):
    """The same-budget sweep (SWEEPS): final held-out figures per value, mean over seeds."""
    from uecjax.metrics import pass_at_k_counts

    n = FLAGS.eval_samples
    s = FLAGS.sweep_seeds
    lines = ["# Same-budget sweep on countdown", "",
             f"Command: `python experiments/entropy_collapse.py --sweep` ({s} seeds per value, "
             f"{FLAGS.steps} steps; every variant: 4 values of its own coefficient). Figures: mean "
             "over seeds, +- half their range. The values are compared on the held-out problems, "
             "so each variant's best value is optimistic, for every variant alike.", "",
             "| variant | field | value | Pass@1 | Pass@64 | Pass@256 | entropy (last 10 steps) |",
             "|---|---|---|---|---|---|---|"]
    results = {}
    for name in [m for m in FLAGS.methods if m in SWEEPS]:
        field, grid = SWEEPS[name]
        run = run_variant(name, model, tokenizer, train, heldout, {**settings, "seeds": s},
                          sweep=(field, grid))
        pk = pass_at_k_counts(run["eval_correct"][:, -1], n, [1, 64, n]).mean(axis=1)  # [runs, 3]
        ent = run["metrics"]["entropy"][:, -10:].mean(axis=1)
        results[name] = dict(field=field, values=list(grid), pass_at_k=pk.tolist(), entropy=ent.tolist(),
                             compile_s=run["compile_s"], run_s=run["run_s"])
        for i, v in enumerate(grid):
            rows = slice(i * s, (i + 1) * s)
            cell = lambda x: f"{x.mean():.3f} +- {(x.max() - x.min()) / 2:.3f}"  # noqa: E731
            lines.append(f"| {name} | {field} | {v:g} | " + " | ".join(cell(pk[rows, j]) for j in range(3))
                         + f" | {cell(ent[rows])} |")
        print(f"sweep {name}: {run['run_s']:.0f}s", flush=True)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(dict(settings=settings, sweep_seeds=s, results=results), f, indent=1)
    print(f"wrote {out}/sweep.md")


def main(argv):
    del argv
    import jax

    from uecjax.countdown_model import prepare_countdown_policy
    from uecjax.data.countdown import countdown_records

    out = FLAGS.out
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    workdir = FLAGS.workdir or os.path.join(out, "work")
    started = time.perf_counter()
    model, tokenizer, _ = prepare_countdown_policy(workdir, correct_fraction=FLAGS.correct_fraction,
                                                   sft_steps=FLAGS.sft_steps, log=print)
    warmup_s = time.perf_counter() - started
    train = task_arrays(countdown_records("train", 2000, seed=0), tokenizer)
    per_level = [countdown_records("test", FLAGS.eval_per_level, seed=1, levels=(lv,)) for lv in (1, 2)]
    heldout_records = [r for recs in per_level for r in recs]
    heldout = task_arrays(heldout_records, tokenizer)
    levels = np.asarray(heldout.level)
    settings = dict(seeds=FLAGS.seeds, steps=FLAGS.steps, eval_every=FLAGS.eval_every,
                    eval_samples=FLAGS.eval_samples, eval_per_level=FLAGS.eval_per_level,
                    train=TRAIN, learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                    correct_fraction=FLAGS.correct_fraction)
    if FLAGS.sweep:
        return sweep_main(model, tokenizer, train, heldout, levels, settings, out)
    runs, timing = {}, {}
    for name in FLAGS.methods:
        if name not in VARIANTS:
            sys.exit(f"--methods: unknown variant {name!r}; known: {list(VARIANTS)}")
        path = os.path.join(out, "runs", f"{name}.npz")
        if os.path.exists(path):
            saved = np.load(path, allow_pickle=False)
            if json.loads(str(saved["settings"])) == settings:
                runs[name] = dict(metrics={k[2:]: saved[k] for k in saved.files if k.startswith("m:")},
                                  eval_correct=saved["eval_correct"], eval_entropy=saved["eval_entropy"])
                timing[name] = json.loads(str(saved["timing"]))
                print(f"{name}: reusing {path}", flush=True)
                continue
        run = run_variant(name, model, tokenizer, train, heldout, settings)
        timing[name] = dict(compile_s=run["compile_s"], run_s=run["run_s"])
        runs[name] = run
        tmp = path + ".tmp.npz"
        np.savez(tmp, settings=json.dumps(settings), timing=json.dumps(timing[name]),
                 eval_correct=run["eval_correct"], eval_entropy=run["eval_entropy"],
                 **{f"m:{k}": v for k, v in run["metrics"].items()})
        os.replace(tmp, path)
        print(f"{name}: compile {run['compile_s']:.0f}s, run {run['run_s']:.0f}s, final entropy "
              f"{run['metrics']['entropy'][:, -10:].mean():.3f}, reward "
              f"{run['metrics']['reward'][:, -10:].mean():.3f}", flush=True)
    summaries = {name: summarize(name, run, levels) for name, run in runs.items()}
    warmup = warmup_figures(list(runs.values()), levels)
    host = host_loop_speed(workdir, FLAGS.host_steps) if FLAGS.host_steps else None
    plot(summaries, out)
    report(summaries, warmup, timing, host, out)
    result = dict(settings=settings, warmup=warmup, timing=timing, host_loop=host,
                  warmup_policy_s=warmup_s, total_s=time.perf_counter() - started,
                  devices=str(jax.devices()),
                  variants={n: {k: v for k, v in s.items() if k != "curves"} for n, s in summaries.items()})
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}/results.md ({result['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__ + "\nflags:\n" + FLAGS.get_help(include_special_flags=False))
        sys.exit(0)
    try:
        FLAGS(sys.argv)
    except flags.Error as e:
        sys.exit(f"entropy_collapse.py: {e} (--help lists the flags)")
    main(sys.argv)
