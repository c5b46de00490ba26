"""Methods x seeds on the embedded demo task: a table and plots in experiments/results/.

    python experiments/compare.py                                   # the committed run
    python experiments/compare.py --methods=grpo,uec --seeds=0,1 --steps=20 --out=/tmp/cmp

Every run starts from the same warmed-up demo policy (prepared once, copied into each run's
workdir; the task and the policy depend on `demo_data.seed` only) and differs from the others
by its method (or UEC ablation) and its run seed (sampling and data order). Each run is
`uecjax.loop.train` with the demo config, so the figures are the training loop's own
metrics: held-out greedy Pass@1, sampled Pass@1 and Pass@k every `--eval_every` steps, and the
per-step rollout reward and policy entropy.

Writes to --out:
    runs/<variant>-s<seed>/       each run's workdir (TensorBoard, metrics.jsonl, checkpoints)
    results.md, results.json      mean and spread (min-max over seeds) of the final held-out
                                  greedy Pass@1, Pass@1, Pass@k and of the final entropy
    entropy.png, reward.png, pass_at_k.png   the curves, seed mean with the min-max band

A finished run (its summary.json exists) is not run again, so an interrupted comparison
continues where it stopped.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags, logging

# The UEC ablations (ALGORITHMS.md sections 6 and 8): one component off at a time.
VARIANTS = {
    "grpo": dict(method="grpo"),
    "dapo": dict(method="dapo"),
    "gspo": dict(method="gspo"),
    "clip_cov": dict(method="clip_cov"),
    "kl_cov": dict(method="kl_cov"),
    "entropy_reg": dict(method="entropy_reg"),
    "aer": dict(method="aer"),
    "uec": dict(method="uec"),
    "uec-no_stabilizer": dict(method="uec", loss=dict(stabilizer=False)),
    "uec-no_gated_explore": dict(method="uec", loss=dict(explore=False)),
    "uec-no_rollout_explore": dict(method="uec", rollout=dict(explore=False)),
    # LoRA (config.model.lora) against full fine-tuning: rank 16 on every projection of the
    # demo's 4 x 128-wide decoder, everything else as the full run; at the full run's learning
    # rate (-same_lr) or at 10x it (the usual LoRA rule of thumb). Neither rate is tuned.
    "grpo-lora": dict(method="grpo", lora=dict(rank=16, alpha=32.0), optim=dict(learning_rate=3e-3)),
    "uec-lora": dict(method="uec", lora=dict(rank=16, alpha=32.0), optim=dict(learning_rate=3e-3)),
    "uec-lora-same_lr": dict(method="uec", lora=dict(rank=16, alpha=32.0)),
}

FLAGS = flags.FLAGS
flags.DEFINE_list("methods", ["grpo", "dapo", "entropy_reg", "aer", "uec", "uec-no_stabilizer",
                              "uec-no_rollout_explore"],
                  f"Variants to run, from {sorted(VARIANTS)}.")
flags.DEFINE_list("seeds", ["0", "1"], "Run seeds.")
flags.DEFINE_integer("steps", 30, "RL steps per run (the demo config's 30).")
flags.DEFINE_integer("eval_every", 15, "Held-out evaluation interval (steps).")
flags.DEFINE_integer("eval_prompts", 128, "Held-out prompts per evaluation.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                    "Output directory.")
flags.DEFINE_list("set", [], "Extra config overrides for every run, e.g. "
                  "optim.learning_rate=3e-4,rollout.prompts_per_batch=8.")


def run_config(variant: str, seed: int, steps: int, eval_every: int, eval_prompts: int,
               overrides=()):
    """The demo config of one run."""
    from configs.demo import get_config

    if variant not in VARIANTS:
        raise app.UsageError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    cfg = get_config()
    spec = VARIANTS[variant]
    cfg.method = spec["method"]
    for section in ("loss", "rollout", "optim"):
        for key, value in spec.get(section, {}).items():
            cfg[section][key] = value
    cfg.model.lora.update(spec.get("lora", {}))
    cfg.seed = seed
    cfg.train.steps = steps
    cfg.train.eval_every = eval_every
    cfg.train.checkpoint_every = 0
    cfg.train.export_hf = False
    cfg.eval.num_prompts = eval_prompts
    for item in overrides:
        key, _, text = item.partition("=")
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string, e.g. rollout.explore_on=accuracy
        if isinstance(node.get(leaf), float) and isinstance(value, int):
            value = float(value)
        node[leaf] = value
    return cfg


def read_curves(jsonl: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (steps, values) from a run's metrics.jsonl."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(jsonl) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((row["step"], float(value)))
    out = {}
    for key, points in series.items():
        last = dict(points)  # a step logged twice (eval then train line) keeps its last value
        steps = np.array(sorted(last))
        out[key] = (steps, np.array([last[s] for s in steps]))
    return out


def summarize(runs: dict[str, list[dict]], k: int) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> figure -> {mean, min, max, n} over seeds."""
    table = {}
    for variant, summaries in runs.items():
        figures = {}
        for name in ("greedy_pass@1", "pass@1", f"pass@{k}"):
            for when in ("initial", "final"):
                values = [s[f"{when}_{name}"] for s in summaries]
                figures[f"{when}_{name}"] = _spread(values)
        figures["final_entropy"] = _spread([s["final_entropy"] for s in summaries])
        table[variant] = figures
    return table


def _spread(values) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def markdown(table, k: int, command: str, seconds: float) -> str:
    fmt = lambda f: f"{f['mean']:.3f} [{f['min']:.3f}, {f['max']:.3f}]"  # noqa: E731
    lines = [
        "# Methods on the embedded demo task",
        "",
        f"Made by `{command}` ({seconds / 60:.0f} min on this machine).",
        "",
        "Held-out problems (test split, disjoint expressions), mean over seeds with "
        "[min, max]; initial = the shared warmed-up policy before RL. Final entropy is the "
        "mean token entropy of the last 5 steps' training batches.",
        "",
        f"| variant | greedy Pass@1 start -> end | Pass@1 start -> end | Pass@{k} start -> end "
        "| final entropy | seeds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for variant, f in table.items():
        lines.append(
            f"| {variant} | {f['initial_greedy_pass@1']['mean']:.3f} -> {fmt(f['final_greedy_pass@1'])} "
            f"| {f['initial_pass@1']['mean']:.3f} -> {fmt(f['final_pass@1'])} "
            f"| {f[f'initial_pass@{k}']['mean']:.3f} -> {fmt(f[f'final_pass@{k}'])} "
            f"| {fmt(f['final_entropy'])} | {f['final_entropy']['n']} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], k: int, out: str) -> list[str]:
    """Seed-mean curves with a min-max band, one line per variant; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [("entropy.png", [("entropy", "policy entropy (training batch)")]),
               ("reward.png", [("reward", "rollout reward")]),
               ("pass_at_k.png", [("eval/pass@1", "held-out Pass@1 (sampled)"),
                                  (f"eval/pass@{k}", f"held-out Pass@{k}"),
                                  ("eval/greedy_pass@1", "held-out greedy Pass@1")])]
    written = []
    for filename, panels in figures:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (metric, title) in zip(axes[0], panels):
            for variant, seeds in curves.items():
                series = [c[metric] for c in seeds if metric in c]
                if not series:
                    continue
                n = min(len(s[0]) for s in series)
                steps = series[0][0][:n]
                values = np.stack([s[1][:n] for s in series])
                if metric in ("entropy", "reward"):  # per-step noise: a 5-step moving mean
                    values = np.stack([_smooth(v, 5) for v in values])
                line, = ax.plot(steps, values.mean(0), label=variant)
                ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15,
                                color=line.get_color())
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving mean (shorter windows at the start)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def prepare_init(out: str, cfg) -> str:
    """The shared warmed-up policy (trained once into out/init/demo_init)."""
    from uecjax.demo_model import prepare_demo_policy

    root = os.path.join(out, "init")
    prepare_demo_policy(root, seed=cfg.demo_data.seed, style=cfg.demo_data.style,
                        template=cfg.prompt.template, use_chat_template=cfg.prompt.use_chat_template,
                        log=print, **cfg.demo.to_dict())
    return os.path.join(root, "demo_init")


def compare(variants, seeds, *, steps: int, eval_every: int, eval_prompts: int, out: str,
            overrides=(), log=print) -> dict:
    from uecjax.loop import train

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    init = None
    summaries: dict[str, list[dict]] = {}
    curves: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            cfg = run_config(variant, seed, steps, eval_every, eval_prompts, overrides)
            workdir = os.path.join(out, "runs", f"{variant}-s{seed}")
            summary_file = os.path.join(workdir, "summary.json")
            if not os.path.exists(summary_file):
                init = init or prepare_init(out, cfg)
                shutil.rmtree(workdir, ignore_errors=True)  # a partial run starts over
                shutil.copytree(init, os.path.join(workdir, "demo_init"))
                t = time.perf_counter()
                summary = train(cfg, workdir, log_console=None)
                if summary["preempted"]:  # SIGTERM: the run saved and stopped; not finished
                    log(f"{variant} seed {seed}: stopped by SIGTERM; run the command again to "
                        "go on (this run starts over)")
                    sys.exit(1)
                summary["seconds"] = time.perf_counter() - t
                c = read_curves(summary["metrics_jsonl"])
                summary["final_entropy"] = float(np.mean(c["entropy"][1][-5:]))
                with open(summary_file + ".tmp", "w") as f:
                    json.dump(summary, f, indent=1)
                os.replace(summary_file + ".tmp", summary_file)
            with open(summary_file) as f:
                summary = json.load(f)
            k = cfg.eval.n
            log(f"{variant} seed {seed}: greedy Pass@1 {summary['initial_greedy_pass@1']:.3f} -> "
                f"{summary['final_greedy_pass@1']:.3f}, Pass@1 {summary['initial_pass@1']:.3f} -> "
                f"{summary['final_pass@1']:.3f}, Pass@{k} {summary[f'initial_pass@{k}']:.3f} -> "
                f"{summary[f'final_pass@{k}']:.3f}, entropy {summary['final_entropy']:.3f} "
                f"({summary.get('seconds', 0):.0f}s)")
            summaries.setdefault(variant, []).append(summary)
            curves.setdefault(variant, []).append(
                read_curves(os.path.join(workdir, "metrics.jsonl")))
    table = summarize(summaries, k)
    command = "python experiments/compare.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python experiments/compare.py"
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"command": command, "k": k, "table": table}, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(table, k, command, time.perf_counter() - start))
    plots = plot(curves, k, out)
    log(f"wrote {os.path.join(out, 'results.md')}, results.json, " +
        ", ".join(os.path.basename(p) for p in plots))
    return table


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # one line per run, not the libraries' INFO lines
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
    compare(FLAGS.methods, [int(s) for s in FLAGS.seeds], steps=FLAGS.steps,
            eval_every=FLAGS.eval_every, eval_prompts=FLAGS.eval_prompts, out=FLAGS.out,
            overrides=FLAGS.set)


if __name__ == "__main__":
    app.run(main)
