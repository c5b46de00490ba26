"""The embedded countdown task: reach the target with each number once, + - * only.

    python -m uecjax.train --config=configs/countdown.py [--config.method=grpo]

No downloads: the run builds a character-level tokenizer and a tiny Qwen2
(`uecjax.countdown_model`), warms it up on diverse attempts (a fraction of them correct), then
trains it with RL on `uecjax.data.countdown` problems, graded in process by
`uecjax.rewards.grader.CountdownGrader`. Level 1 (3 numbers) is solved by a uniform guess about 9% of
the time, level 2 (4 numbers, rare targets) under 1%: there, success needs exploration.
The settings are those of the entropy-collapse testbed (`experiments/entropy_collapse.py`,
which runs the same task and model through the compiled loop `uecjax.testbed`): this is the
host loop on the same problem, for checkpoints, TensorBoard and real-size sharding. A 30-step
run shows the loop working on the task; the testbed's 200-step runs show what RL does to it.
"""

from uecjax.config import base_config


def get_config():
    c = base_config()
    c.method = "uec"
    c.data.kind = "countdown"
    c.data.eval_split = "test"
    # The problems (uecjax.data.countdown.countdown_records arguments); the warm-up policy and
    # the problems depend on countdown_data.seed only, so runs with different `seed`s
    # (sampling, data order) start from the same policy on the same problems.
    c.countdown_data.update(num_train=1500, num_eval=128, levels=(1, 2), seed=0)
    # Settings of uecjax.countdown_model.prepare_countdown_policy: 1000 warm-up problems, 4
    # targets each; on level 1 they are correct solutions, on level 2 uniform random attempts,
    # so the policy starts well-formed and diverse: sampled Pass@1 about 0.12 on held-out
    # problems (level 1 about 0.24, level 2 under 0.01), response entropy about 0.66 nats. About
    # 45 s on 2 cores, once: later runs in the same workdir reuse WORKDIR/countdown_init.
    c.countdown.update(num_train=1000, samples_per_problem=4, correct_fraction=1.0,
                       correct_levels=(1,), sft_steps=1000, batch_size=64, learning_rate=3e-3)
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.prompt.template = "plain"  # the bare problem, `3 5 7 to 22:` (about 12 tokens)
    c.prompt.use_chat_template = False
    c.reward.format_weight = 0.0  # reward = accuracy; the warm-up already gives the format
    c.loss.beta = 0.01
    c.rollout.prompts_per_batch = 16
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 32
    c.rollout.max_new_tokens = 10  # a 4-number expression is 7 characters, then <|im_end|>
    c.rollout.explore_samples = 8
    # Adam's first steps move every parameter by about lr, and this 0.08M-parameter policy is
    # sensitive: measured, one update at 2e-3 moved the sampled tokens' log-probs by a KL of
    # 266 nats per token, at 2e-4 by 0.02. 6e-4 with a 10-update warm-up learns (held-out
    # Pass@1 up) and collapses entropy within 200 steps (experiments/results/entropy).
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 10
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.0
    c.train.updates_per_rollout = 2
    c.train.steps = 30
    c.train.eval_every = 15
    c.train.checkpoint_every = 15
    c.eval.num_prompts = 128
    c.eval.n = 8
    c.eval.max_new_tokens = 10
    c.eval.batch_prompts = 128
    return c
