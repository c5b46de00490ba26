"""Qwen2.5 on a local math dataset (MATH, DAPO-17k, ...): `\\boxed{}` answers, UEC-RL.

    python -m uecjax.train --config=configs/math.py \\
        --config.model.path=/models/Qwen2.5-Math-7B --config.data.path=/data/math

data.path: a parquet / jsonl file, a glob, or a directory in the hub layout
(data/train-*.parquet, data/test-*.parquet) with `problem` and `answer` columns (a `solution`
column with a boxed answer also works). Download elsewhere, e.g.
`huggingface-cli download Qwen/Qwen2.5-Math-7B --local-dir /models/Qwen2.5-Math-7B` and
`huggingface-cli download --repo-type dataset <math dataset> --local-dir /data/math`.
"""

from uecjax.config import base_config


def get_config():
    c = base_config()
    c.method = "uec"
    c.data.kind = "math"
    c.data.path = ""  # required: set on the command line
    c.model.path = ""  # required: set on the command line
    c.model.hub_repo = "Qwen/Qwen2.5-Math-7B"
    c.rollout.prompts_per_batch = 32
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 1024
    c.rollout.max_new_tokens = 2048
    c.rollout.explore_samples = 20
    c.optim.learning_rate = 1e-6
    c.train.steps = 500
    # Four PPO updates per rollout batch, one epoch: verl's and EasyR1's GRPO examples (e.g.
    # 512 rollout prompts, 128 per update); DAPO's recipe takes 16 (512 / 32).
    c.train.updates_per_rollout = 4
    c.train.epochs = 1
    c.train.micro_batches = 8  # 8 rows per micro-batch of an update's 64
    # Pack each device's rows of a micro-batch into rows of prompt + response tokens: math
    # responses are long-tailed, so most rows' padding goes (uecjax.packing).
    c.train.pack = True
    c.eval.max_new_tokens = 2048
    return c
