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
responses at T = 1.0; four PPO updates per rollout batch (EasyR1: rollout_batch_size 512,
global_batch_size 128, one epoch; here 16 prompts a rollout, 4 prompts = 20 rows an update);
AdamW lr 1e-6, weight decay 0.01, grad norm 1.0; KL to the initial
policy with the k3 ("low_var_kl") estimator, beta 0.01; the vision tower trains
(freeze_vision_tower: false there; `--config.model.freeze_vision=True` freezes it). The method
is `uec`; `--config.method=grpo` gives the GRPO baseline on the same settings.

Memory. The defaults are sized for one 80 GB GPU (H100 / A100-80G) with the 3B: bf16 compute,
float32 master weights (lr 1e-6 updates vanish in bfloat16), bfloat16 Adam moments
(optim.state_dtype), the reference policy stored in bf16 (exact: it is only ever read in
bf16), full remat, one row per micro-batch (micro_batches = 20, the rows of one update), and
the vision tower trained.
Let XLA take the whole GPU: XLA_PYTHON_CLIENT_MEM_FRACTION=0.95. Check a layout before any
weights exist (vision tower and one 512^2 image per row included; uecjax/dry_run.py,
--config.vision.dry_run_pixels for larger images):

    python -m uecjax.train --config=configs/geo3k.py --dry_run \
        --config.model.preset=qwen2.5-vl-3b [--dry_run_devices=8 --config.mesh.fsdp=8 \
        --config.mesh.data=1 --config.rollout.prompts_per_batch=32 --config.train.micro_batches=5]

Measured that way before updates were split per rollout (80-row train steps; GiB per device:
parameters + moments + reference + temporaries = total; temporaries are the CPU compiler's
estimate, an approximation of the GPU / TPU compilers'). What sets them is the rows per device
per micro-batch, which the mini-batch split keeps when micro_batches shrinks with it:

    rows per device per micro-batch
    3B, 1 device, defaults                     1    14.0 + 14.0 + 7.0 + 37.5 = 73.0
    3B, 1 device, float32 moments              2    14.0 + 28.0 + 7.0 + 40.7 = 90.2
    3B, fsdp=4                                 1     3.5 +  3.5 + 1.7 + 16.7 = 25.6
    3B, fsdp=8                                 1     1.8 +  1.8 + 0.9 + 16.3 = 20.7
    7B, fsdp=8                                 1     3.9 +  3.9 + 1.9 + 29.2 = 38.9
    7B, 1 device, defaults                     1    30.9 + 30.9 + 15.4 + 81.1 = 158.8

(batch arrays, 0.07-0.55 GiB, are in the totals). The vision tower (0.67B) is split over fsdp
like the decoder; `--config.model.freeze_vision=True` drops its moments and gradients. The
sampler's KV cache is not in these figures: it lives while the train step's buffers do not.

Qwen2.5-VL-7B-Instruct (--config.model.path=/models/Qwen2.5-VL-7B-Instruct
--config.model.hub_repo=Qwen/Qwen2.5-VL-7B-Instruct, the paper's model): 8.3B parameters; it
needs several GPUs with FSDP, e.g. 8 x 80 GB with --config.mesh.fsdp=8 --config.mesh.data=1
--config.rollout.prompts_per_batch=32 --config.train.micro_batches=5 (40 rows an update: one
row per GPU per micro-batch).

TPU: the same mesh axes. Rows per update (B * G / train.updates_per_rollout, 20 by default)
must be a multiple of micro_batches x data x fsdp. v4-8 (4 chips of 32 GB): fsdp=4,
micro_batches=5 (25.6 GiB above). v5e-8 (16 GB per chip): 20.7 GiB per chip by the estimate
above, over its HBM; v5e-16 (fsdp=16, 64 prompts a rollout, micro_batches=5) 24.9 GiB by the
same estimate,
whose temporaries do not shrink with more chips. On a TPU VM, `--dry_run` without
--dry_run_devices gives the TPU compiler's own figures: check there, and shorten
rollout.max_new_tokens or freeze the tower if it does not fit. Grow `fsdp` until the state
fits, then `data`.
"""

from uecjax.config import base_config


def get_config():
    c = base_config()
    c.method = "uec"

    c.model.path = "/models/Qwen2.5-VL-3B-Instruct"  # 7B: /models/Qwen2.5-VL-7B-Instruct (see above)
    c.model.hub_repo = "Qwen/Qwen2.5-VL-3B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"  # master weights: lr 1e-6 updates vanish in bfloat16
    c.model.remat = "full"
    c.model.freeze_vision = False  # EasyR1: freeze_vision_tower false
    c.vision.min_pixels = 262144  # 512^2: about 1340 patches, 340 image tokens per diagram at least
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

    c.rollout.prompts_per_batch = 16  # B: 80 rows a rollout
    c.rollout.group_size = 5  # G
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.max_prompt_len = 2048  # image tokens included; longer prompts are skipped, counted
    c.rollout.max_new_tokens = 2048
    c.rollout.explore_samples = 10  # G' for hard prompts (uec)

    c.optim.learning_rate = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0
    c.optim.state_dtype = "bfloat16"  # Adam moments: 14 GiB less than float32 for the 3B

    c.train.steps = 400  # about 3 epochs of the 2101 training problems
    c.train.updates_per_rollout = 4  # EasyR1: 512 rollout prompts, 128 per update
    c.train.epochs = 1
    c.train.micro_batches = 20  # one row per micro-batch of an update's 20 (memory note above)
    # No packing: with one row per micro-batch there is nothing to pack it with (train.pack
    # packs the rows of a micro-batch; it pays with several rows per micro-batch, configs/math.py).
    c.train.pack = False
    c.train.chunk_size = 1024
    c.train.eval_every = 50
    c.train.checkpoint_every = 25

    c.eval.num_prompts = 0  # the whole test split (601)
    c.eval.n = 8  # Pass@1 .. Pass@8 from 8 samples, plus greedy Pass@1
    c.eval.temperature = 1.0
    c.eval.max_new_tokens = 2048
    c.eval.batch_prompts = 8
    return c
