"""The embedded default: UEC-RL on arithmetic word problems the package generates itself.

    python -m uecjax.train --config=configs/demo.py

No downloads: the run builds a character-level tokenizer and a tiny Qwen2, warms it up with a
short supervised phase (so the policy starts with a partial success rate, and the hard
levels stay hard), then trains it with `uec` on a 2-core CPU in minutes, and prints held-out
Pass@1 at the start and the end.
"""

from uecjax.config import base_config


def get_config():
    c = base_config()
    c.method = "uec"
    c.data.kind = "demo"
    c.data.eval_split = "test"
    # The task: problems and the warm-up policy depend on demo_data.seed only, so runs with
    # different `seed`s (sampling, data order) start from the same policy on the same problems.
    c.demo_data.update(num_train=4000, num_eval=128, levels=(1, 2, 3, 4), style="expression",
                       seed=0)
    # Settings of uecjax.demo_model.prepare_demo_policy (tiny model + supervised warm-up). The
    # warm-up teacher is careless (`slip`): half its boxed answers are off by 1-2, so the
    # policy starts knowing the arithmetic but copying its result into the box only about
    # half the time when sampling: room for RL with a verifiable reward to show in minutes.
    c.demo.update(slip=0.5, sft_steps=1200, batch_size=32, learning_rate=3e-3)
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.prompt.template = "plain"  # the warm-up teaches the <think>...</think> \boxed{} format
    c.prompt.use_chat_template = True
    c.reward.num_workers = 1
    c.reward.timeout_s = 2.0
    # A KL to the warmed-up policy (k3) keeps the tiny model's fragile arithmetic from
    # drifting under noisy policy-gradient steps (measured: without it held-out greedy
    # Pass@1 fell while the copy habit improved).
    c.loss.beta = 0.05
    c.rollout.prompts_per_batch = 16
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 128
    c.rollout.max_new_tokens = 48
    c.rollout.explore_samples = 8
    # Adam's first steps are sign steps of size lr on every parameter: warm up, and an eps
    # near the typical gradient entry (~1e-4 here) damps parameters that only see noise.
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 20  # optimizer updates: the first 10 rollouts
    c.optim.eps = 1e-5
    c.optim.weight_decay = 0.0
    c.train.steps = 30
    # Two PPO updates per rollout batch (64 rows each, pi_old fixed at rollout time), so that
    # the clip, the dual clip and DAPO's clip-higher act (with one update pi = pi_old).
    c.train.updates_per_rollout = 2
    c.train.eval_every = 15
    c.train.checkpoint_every = 15
    c.eval.num_prompts = 128
    c.eval.n = 8
    c.eval.max_new_tokens = 48
    c.eval.batch_prompts = 64
    return c
