"""`python -m uecjax.train --config=configs/demo.py [--config.a.b=v] [--workdir=DIR] [--dry_run]`:
the command-line entry of RL training (`uecjax.loop.train`) and of the dry run
(`uecjax.dry_run`: compile the train step abstractly, print the memory it needs per device).
Multi-process jobs (TPU slices, SLURM, explicit flags) join here first (`uecjax.parallel.launch`).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from uecjax import cli
from uecjax.config import ConfigValueError, validate
from uecjax.dry_run import dry_run, simulate_cpu_devices
from uecjax.loop import train
from uecjax.parallel import launch

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
            if FLAGS.dry_run_devices:
                simulate_cpu_devices(FLAGS.dry_run_devices)
            dry_run(cfg)
            return
        if FLAGS.dry_run_devices:
            raise ConfigValueError("--dry_run_devices needs --dry_run")
        launch.initialize_from_flags()  # before anything touches a device
        train(cfg, workdir)
    except cli.USER_ERRORS as e:
        # User mistakes (bad values, missing data or checkpoints): the message, no traceback.
        cli.fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser())
