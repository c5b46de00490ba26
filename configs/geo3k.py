r"""Qwen2.5-VL-3B-Instruct on Geometry3K with UEC-RL: the paper's VLM setting, on EasyR1's recipe.

    python -m uecjax.train --config=configs/geo3k.py \
        [--config.model.path=/models/Qwen2.5-VL-3B-Instruct] [--config.data.path=/data/geometry3k]

Download elsewhere (the library fetches nothing) and copy the directories here:

    huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct --local-dir /models/Qwen2.5-VL-3B-Instruct
    huggingface-cli download hiyouga/geometry3k --repo-type dataset --local-dir /data/geometry3k

data.path holds the hub's parquet files (data/train-*.parquet 2101 problems, validation 300,
test 601) with columns images, problem ("<image>" + text), answer. A missing path stops the
run with these commands.

Recipe (EasyR1's examples/qwen2_5_vl_3b_geo3k_grpo.sh and config.yaml): images between 512^2
and 2048^2 pixels; the think / \boxed{} prompt; reward 0.9 accuracy + 0.1 format; G = 5
responses at T = 1.0; AdamW lr 1e-6, weight decay 0.01, grad norm 1.0; KL to the initial
policy with the k3 ("low_var_kl") estimator, beta 0.01; the vision tower trains
(freeze_vision_tower: false there; `--config.model.freeze_vision=True` freezes it). The method
is `uec`; `--config.method=grpo` gives the GRPO baseline on the same settings.

Memory on one 80 GB GPU (H100 / A100-80G), bf16 compute, float32 master weights:
parameters 3.75B x 4 B = 15 GB, Adam moments 30 GB, gradient accumulator 15 GB, reference
policy 7.5 GB (stored in the bf16 compute dtype, which is exact: it is only ever read in it),
about 68 GB before activations. Micro-batches of 2 rows (micro_batches = rows / 2) with
per-layer remat keep the step's activations near 5 GB at 4096 tokens (the [heads, T, T]
attention scores dominate); the sampler's bf16 KV cache for 80 rows x 4096 slots is 12 GB,
when the gradients are gone. Let XLA take the whole GPU: XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.
If it still runs out: --config.rollout.prompts_per_batch=8 (and micro_batches=20), or
--config.model.freeze_vision=True (no moments for the tower, -5 GB).

Qwen2.5-VL-7B-Instruct (--config.model.path=/models/Qwen2.5-VL-7B-Instruct
--config.model.hub_repo=Qwen/Qwen2.5-VL-7B-Instruct, the paper's model): 8.3B parameters, about
150 GB of weights, moments and gradients; shard them with FSDP over several GPUs, e.g. 4 x 80 GB
with --config.mesh.fsdp=4 --config.mesh.data=1 --config.train.micro_batches=20.

Check a layout before any weights exist (vision tower and one image per row included; see
uecjax/dry_run.py, --config.vision.dry_run_pixels for larger images):

    python -m uecjax.train --config=configs/geo3k.py --dry_run \
        --config.model.preset=qwen2.5-vl-3b [--dry_run_devices=8 --config.mesh.fsdp=8 \
        --config.mesh.data=1 --config.train.micro_batches=10]

Per device it reports (GiB; one 512^2 image per row; "temporaries" are the CPU compiler's
estimate): 3B on 1 device 14.0 parameters, 28.0 moments, 7.0 reference, 40.7 temporaries;
3B with fsdp=8 3.9 + 7.8 + 1.9 + 20.1; 7B with fsdp=4 9.6 + 19.1 + 4.8 + 32.3. The vision tower
(0.67B) is replicated, not split by fsdp: with fsdp=8 it is 2.5 of the 3.9 GiB of parameters
and 4.9 of the 7.8 GiB of moments; freeze_vision takes the latter away.

TPU: the same mesh axes. Rows per batch must be a multiple of micro_batches x data x fsdp
(with fsdp=8, --config.train.micro_batches=10 is one row per chip per micro-batch). By the dry
run the 3B does not fit small chips with the tower trained: v5e-8 (16 GB HBM per chip) holds
13.6 GiB of state per chip (fsdp=8) before activations; v4-8 (4 chips of 32 GB, fsdp=4,
micro_batches=20) 18.7 GiB of state and 37.8 GiB with the CPU-estimated temporaries. Freezing
the tower takes 4.9 GiB of moments off every chip (v5e-8: 8.7 GiB of state); else take a
larger slice: grow `fsdp` until the state fits, then `data`.
"""

from uecjax.config import base_config


def get_config():
    c = base_config()
    c.method = "uec"

    c.model.path = "/models/Qwen2.5-VL-3B-Instruct"  # 7B: /models/Qwen2.5-VL-7B-Instruct (see above)
    c.model.hub_repo = "Qwen/Qwen2.5-VL-3B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # master weights: lr 1e-6 updates vanish in bfloat16
    c.model.remat = True
    c.model.freeze_vision = False  # EasyR1: freeze_vision_tower false
    c.vision.min_pixels = 262144  # 512^2: about 1340 image tokens per diagram at least
    c.vision.max_pixels = 4194304  # 2048^2

    c.data.kind = "geometry3k"
    c.data.path = "/data/geometry3k"
    c.data.train_split = "train"
    c.data.eval_split = "test"

    c.prompt.template = "think_boxed"
    c.prompt.use_chat_template = True
    c.reward.format_weight = 0.1  # r = 0.9 accuracy + 0.1 format

    c.loss.beta = 0.01
    c.loss.kl_kind = "k3"  # EasyR1's low_var_kl

    c.rollout.prompts_per_batch = 16  # B: 80 rows a step
    c.rollout.group_size = 5  # G
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_prompt_len = 2048  # image tokens included; longer prompts are skipped, counted
    c.rollout.max_new_tokens = 2048
    c.rollout.explore_samples = 10  # G' for hard prompts (uec)

    c.optim.learning_rate = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0

    c.train.steps = 400  # about 3 epochs of the 2101 training problems
    c.train.micro_batches = 40  # 2 rows per micro-batch (see the memory note above)
    c.train.chunk_size = 1024
    c.train.eval_every = 50
    c.train.checkpoint_every = 25

    c.eval.num_prompts = 0  # the whole test split (601)
    c.eval.n = 8  # Pass@1 .. Pass@8 from 8 samples, plus greedy Pass@1
    c.eval.temperature = 1.0
    c.eval.max_new_tokens = 2048
    c.eval.batch_prompts = 8
    return c
