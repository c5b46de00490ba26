"""`python -m uecjax.evaluate --config=configs/demo.py --checkpoint=DIR [--split=test] [--n=8]
[--num_prompts=N] [--output=metrics.json] [--config.eval.temperature=0.6 ...]`: greedy Pass@1
and sampled Pass@k (`uecjax.evaluate.evaluate`) of a Hugging Face layout checkpoint (a run's
export) on the config's held-out records; one JSON line on stdout. The checkpoint loads as in
training (`uecjax.setup.load_policy`, on config.mesh); in a multi-process job every process
evaluates its block of every batch and process 0 prints.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from uecjax import cli
from uecjax.evaluate import evaluate
from uecjax.parallel import launch
from uecjax.parallel.hosts import Hosts
from uecjax.parallel.launch import is_main_process
from uecjax.rewards.grader import make_grader
from uecjax.sampler import Sampler
from uecjax.setup import load_policy, make_records, run_mesh

FLAGS = flags.FLAGS


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Training config file (configs/<name>.py).")
    flags.DEFINE_string("checkpoint", None, "HF-layout checkpoint directory (default: "
                        "config.model.path).")
    flags.DEFINE_string("split", None, "Data split to evaluate (default: config.data.eval_split).")
    flags.DEFINE_integer("n", None, "Samples per prompt for Pass@k (default: config.eval.n).")
    flags.DEFINE_integer("num_prompts", None, "Evaluate the first N records (default: "
                         "config.eval.num_prompts; 0: all).")
    flags.DEFINE_string("output", None, "Also write the JSON metrics to this file.")
    launch.define_flags()


def main(argv) -> None:
    del argv
    cfg = FLAGS.config  # cli.config_flags_parser has loaded it (or exited)
    split = FLAGS.split or cfg.data.eval_split
    try:
        launch.initialize_from_flags()  # before anything touches a device
        mesh = run_mesh(cfg)
        policy = load_policy(cfg, mesh, checkpoint=FLAGS.checkpoint, lora=False)
        records = make_records(cfg, split, train=False, num_prompts=FLAGS.num_prompts)
    except cli.USER_ERRORS as e:
        cli.fail(str(e))
    tokenizer = policy.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with make_grader(cfg.data.kind, num_workers=cfg.reward.num_workers,
                     format_weight=cfg.reward.format_weight, timeout_s=cfg.reward.timeout_s,
                     think_prefilled=cfg.reward.think_prefilled) as grader:
        metrics = evaluate(
            Sampler(policy.model, pad_id=pad_id, mesh=mesh, batching=cfg.sampler.batching,
                    slots=cfg.sampler.slots or None), tokenizer, records, grader,
            n=FLAGS.n or cfg.eval.n, max_new_tokens=cfg.eval.max_new_tokens,
            temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
            batch_prompts=cfg.eval.batch_prompts, prompt_template=cfg.prompt.template,
            use_chat_template=cfg.prompt.use_chat_template, seed=cfg.seed,
            progress=is_main_process(), image_processor=policy.image_processor,
            hosts=Hosts.of_mesh(mesh))  # each process grades its own block of every batch
    checkpoint = FLAGS.checkpoint or cfg.model.path
    line = json.dumps({"checkpoint": os.path.abspath(checkpoint), "split": split, **metrics})
    if not is_main_process():  # every process computed the same metrics
        return
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)


def run() -> None:
    define_flags()
    app.run(main, flags_parser=cli.config_flags_parser())


if __name__ == "__main__":
    run()
