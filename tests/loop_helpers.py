"""A tiny RL run's config for end-to-end tests (no uecjax.train import: config files load it)."""

from uecjax.config import base_config


def tiny_config(policy_dir, method="grpo", steps=2):
    c = base_config()
    c.method = method
    c.model.path = policy_dir
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.kind = "demo"
    c.demo_data.update(num_train=64, num_eval=4, levels=(1,), style="expression")
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


def write_policy(path):
    """A tiny random Qwen2 over the demo's character vocabulary, with its tokenizer, at `path`."""
    from tiny_hf import write_tiny_qwen2
    from uecjax.tokenizer import char_tokenizer

    tok = char_tokenizer()
    write_tiny_qwen2(path, std=0.05, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=True)
    tok.save_pretrained(str(path))
    return str(path)


def fsdp_config(policy_dir, steps, method="entropy_reg"):
    """tiny_config on all devices as one fsdp axis, with non-zero gradients (entropy bonus)
    and a reference model: the multi-process test's run."""
    c = tiny_config(policy_dir, method, steps=steps)
    c.loss.beta = 0.01
    c.mesh.num_devices = 0
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.train.export_hf = True
    c.eval.num_prompts = 2
    return c


def geo3k_config(policy_dir, data_dir, steps):
    """configs/geo3k.py with a tiny Qwen2.5-VL, the real samples and small sizes, on all
    devices as one fsdp axis: the multi-process VL run. Images of 112-140 patches, so rows
    fall in patch buckets of 128 and 256."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "geo3k.py")
    spec = importlib.util.spec_from_file_location("geo3k_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    # The tiny random policy fails every prompt (all advantages 0): the entropy bonus gives a
    # real gradient to compare, where GRPO's would be round-off.
    c.method = "entropy_reg"
    c.model.path, c.data.path = policy_dir, data_dir
    c.data.train_split = c.data.eval_split = "samples"
    c.model.dtype, c.model.remat = "float32", "none"
    c.vision.min_pixels, c.vision.max_pixels = 28 * 28 * 4, 168 * 168
    c.rollout.prompts_per_batch, c.rollout.group_size = 2, 2
    c.rollout.max_prompt_len, c.rollout.max_new_tokens = 512, 8
    c.rollout.max_rounds = 1
    c.train.steps, c.train.micro_batches = steps, 1
    c.train.updates_per_rollout = 1  # 4 rows a rollout, split over every device
    c.train.checkpoint_every, c.train.eval_every, c.train.export_hf = 1, 0, False
    c.eval.num_prompts, c.eval.n, c.eval.max_new_tokens, c.eval.batch_prompts = 2, 2, 8, 2
    c.reward.num_workers = 1
    c.mesh.num_devices = 0
    c.mesh.data, c.mesh.fsdp = 1, -1
    return c
