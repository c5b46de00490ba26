"""A tiny RL run's config for end-to-end tests (no uecjax.train import: config files load it)."""

from uecjax.config import base_config


def tiny_config(policy_dir, method="grpo", steps=2):
    c = base_config()
    c.method = method
    c.model.path = policy_dir
    c.model.dtype = "float32"
    c.model.remat = False
    c.data.kind = "demo"
    c.demo_data = dict(num_train=64, num_eval=4, levels=(1,), style="expression")
    c.prompt.template = "plain"
    c.reward.num_workers = 1
    c.loss.beta = 0.01 if method in ("grpo", "uec") else 0.0
    c.rollout.prompts_per_batch = 2
    c.rollout.group_size = 2
    c.rollout.max_prompt_len = 64
    c.rollout.max_new_tokens = 8
    c.rollout.explore_samples = 2
    c.rollout.max_rounds = 2
    c.optim.learning_rate = 1e-3
    c.train.steps = steps
    c.train.eval_every = 0
    c.train.checkpoint_every = 1
    c.train.export_hf = False
    c.eval.num_prompts = 4
    c.eval.n = 2
    c.eval.max_new_tokens = 8
    c.eval.batch_prompts = 4
    c.mesh.num_devices = 1  # the suite simulates 8 CPU devices; these runs use one
    return c
