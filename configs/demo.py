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
    c.demo_data = dict(num_train=4000, num_eval=128, levels=(1, 2, 3, 4), style="expression")
    # Settings of uecjax.demo_model.prepare_demo_policy (tiny model + supervised warm-up).
    c.demo = dict()
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.prompt.template = "plain"  # the warm-up teaches the <think>...</think> \boxed{} format
    c.prompt.use_chat_template = True
    c.reward.num_workers = 1
    c.reward.timeout_s = 2.0
    c.loss.beta = 0.0
    c.rollout.prompts_per_batch = 16
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 128
    c.rollout.max_new_tokens = 48
    c.rollout.explore_samples = 8
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.train.steps = 60
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.eval.num_prompts = 128
    c.eval.n = 8
    c.eval.max_new_tokens = 48
    c.eval.batch_prompts = 64
    return c
