r"""Qwen2.5-VL-7B-Instruct (the paper's model) on Geometry3K with UEC-RL and LoRA, on one 80 GB GPU.

    python -m uecjax.train --config=configs/geo3k_lora.py \
        [--config.model.path=/models/Qwen2.5-VL-7B-Instruct] [--config.data.path=/data/geometry3k]

Download elsewhere (the library fetches nothing):

    huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir /models/Qwen2.5-VL-7B-Instruct
    huggingface-cli download hiyouga/geometry3k --repo-type dataset --local-dir /data/geometry3k

Everything is configs/geo3k.py (EasyR1's recipe: G = 5 at T = 1.0, four updates per rollout,
0.9 accuracy + 0.1 format, k3 KL beta 0.01, 2048 + 2048 tokens) except:

* LoRA rank 64, alpha 128 on every decoder projection (q, k, v, o, gate, up, down; 161M
  adapter parameters, 1.9% of 8.3B). The base (decoder, embedding, vision tower) is frozen,
  so `model.freeze_vision` has no effect. The KL reference is the base itself (adapters off):
  no second copy of the weights.
* The frozen base is stored in bfloat16 (param_dtype): it is never updated, so there are no
  vanishing updates to keep float32 master weights for; the adapters are float32 whatever the
  base's dtype.
* AdamW lr 1e-5: 10x the full fine-tuning lr, the usual LoRA rule of thumb; a choice, not
  tuned here. On the demo task 10x overshot where the full run's rate learnt
  (experiments/results/lora/results.md): compare against `--config.optim.learning_rate=1e-6`.

Memory per device, from the dry run (no weights allocated; temporaries are the CPU
compiler's estimate, an approximation of the GPU's; GiB per device):

    python -m uecjax.train --config=configs/geo3k_lora.py --dry_run \
        --config.model.preset=qwen2.5-vl-7b

                                  trained + frozen + moments + reference + temporaries = total
    configs/geo3k.py with the 7B (full)   30.9 +    0   +  30.9   +  15.4   +  77.0  = 154.3
    this config, 1 device                 0.60 +  15.4  +  0.60   +  0.60   +  36.6  =  54.0
    this config, 8 devices (fsdp=8, 32 prompts, micro_batches=5)
                                         0.075 +  1.93  + 0.075   + 0.075   +  23.0  =  25.2

(totals include the batch arrays, 0.04-0.14 GiB; the reference is the zeroed adapters.) The
CPU compiler computes bfloat16 matmuls in float32 and keeps a float32 copy of a bfloat16 base
for the step; with a float32 base the temporaries are 8.9 GiB (total 41.8), so expect the GPU's
own figure (`--dry_run` on the GPU) below 54. BUILD.md, "LoRA", has the full-against-LoRA
table. The sampler's KV cache is not included; the frozen base stays resident beside it.

After training, WORKDIR/adapter holds the adapter in the PEFT layout
(`peft.PeftModel.from_pretrained(base, WORKDIR/adapter)`, vLLM's LoRA loader) and
WORKDIR/export the merged model in the Hugging Face layout (train.export_hf).
"""

import importlib.util
import os


def _geo3k_config():
    """configs/geo3k.py's config (loaded by path: config files are not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "geo3k.py")
    spec = importlib.util.spec_from_file_location("uecjax_configs_geo3k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _geo3k_config()
    c.model.path = "/models/Qwen2.5-VL-7B-Instruct"
    c.model.hub_repo = "Qwen/Qwen2.5-VL-7B-Instruct"
    c.model.param_dtype = "bfloat16"  # the frozen base; the adapters are float32
    c.model.lora.rank = 64
    c.model.lora.alpha = 128.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.optim.learning_rate = 1e-5
    return c
