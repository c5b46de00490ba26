"""The run configuration: one ml_collections ConfigDict, every field documented here.

Config files (`configs/*.py`) start from `base_config()` and change single fields (a section
assigned as a dict is replaced whole). The command line overrides fields the config holds,
e.g. `--config.method=grpo --config.loss.beta=0.02 --config.train.steps=200`; other loss or
rollout overrides (loss.alpha, ...) go into the config file first. Every section is always
present, so readers use plain attributes (cfg.demo_data.seed).

`validate(cfg, dry_run=...)` turns any bad value into one ConfigValueError naming the field
and what is allowed, including what the method's LossConfig, RolloutConfig, OptimConfig and
UpdatePlan reject; `derive(cfg, frozen)` builds those (a `Derived`) through the same checks,
so a run trains with exactly what was validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re

import ml_collections
from ml_collections import config_dict

from uecjax.countdown_model import COUNTDOWN_MODEL, prepare_countdown_policy
from uecjax.data import countdown, demo
from uecjax.demo_model import DEMO_MODEL, prepare_demo_policy
from uecjax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_MODES, TextConfig
from uecjax.models.lora import LoraError, LoraSpec
from uecjax.models.presets import PRESETS
from uecjax.objectives.loss_config import LossConfig
from uecjax.objectives.methods import METHODS, loss_config
from uecjax.optim import STATE_DTYPES, OptimConfig
from uecjax.rollout import RolloutConfig, rollout_config
from uecjax.sampler import BATCHING as SAMPLER_BATCHING
from uecjax.tokenizer import PROMPT_TEMPLATES
from uecjax.updates import UpdatePlan

DATA_KINDS = ("demo", "countdown", "geometry3k", "math", "jsonl")
# Tasks the package generates itself: no data path, and without model.path the run prepares
# its own tiny policy (uecjax.demo_model, uecjax.countdown_model).
EMBEDDED_KINDS = ("demo", "countdown")


class ConfigValueError(ValueError):
    """A config value out of range; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # RL method: a key of uecjax.objectives.methods.METHODS (grpo, dapo, entropy_reg, clip_cov,
    # kl_cov, entropy_adv, gspo, aer, uec, uec_code). Its loss and rollout presets apply first.
    c.method = "uec"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # Hugging Face checkpoint directory (config.json, safetensors, tokenizer)
    # Named decoder shape (uecjax.models.presets: qwen2.5-0.5b ... qwen2.5-vl-7b, tiny) for
    # `--dry_run` without a checkpoint; a run that trains reads the shape from model.path.
    c.model.preset = ""
    c.model.dtype = "bfloat16"  # compute dtype; softmax, norms, log-probs stay float32
    c.model.param_dtype = "float32"  # storage dtype of the parameters: float32 | bfloat16
    # What the backward pass recomputes: none | per_layer | full (uecjax.models.qwen2.
    # remat_policy). True / False from older configs mean full / none, hence the open type.
    c.model.remat = config_dict.FieldReference("full", field_type=object)
    # Attention: auto | xla | chunked | cudnn | splash (uecjax.models.attention). auto takes
    # cuDNN's fused kernel on NVIDIA GPUs, Pallas splash attention on TPUs, and on CPU the
    # exact path for short sequences and the chunked (memory ~ T) one for long.
    c.model.attention = "auto"
    # Keep the reference model's parameters (beta > 0) in pinned host memory between its
    # log-prob passes, on backends that have it (GPU, TPU); on CPU devices already live in
    # host memory and this does nothing.
    c.model.offload_reference = False
    # Qwen2.5-VL: keep the vision tower fixed (no gradient, no update, no weight decay, no
    # optimizer state). False trains it, as EasyR1's geo3k recipe does (freeze_vision_tower).
    c.model.freeze_vision = False
    # LoRA (uecjax.models.lora): rank > 0 trains rank-r adapters on the decoder's projections
    # (targets, comma-separated from q,k,v,o,gate,up,down) scaled by alpha / rank; the base
    # weights, the vision tower included, stay frozen (freeze_vision has no effect), the KL
    # reference is the base with the adapters off (no copy), and optimizer state and
    # checkpoints hold the adapters alone. dropout: on the adapters' input in the
    # differentiated pass only (0 as EasyR1 / verl). 0: full fine-tuning.
    c.model.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=64.0, targets="q,k,v,o,gate,up,down", dropout=0.0))
    # The Hugging Face repository of the checkpoint, named in the download command printed
    # when model.path does not exist.
    c.model.hub_repo = "Qwen/Qwen2.5-1.5B-Instruct"

    # Images (Qwen2.5-VL policies): each is resized so that its pixel count lies in
    # [min_pixels, max_pixels] (sides multiples of 28), then cut into 14x14 patches; a prompt
    # costs about pixels / 784 tokens per image. 512^2 .. 2048^2 as EasyR1's recipe.
    c.vision = ml_collections.ConfigDict()
    c.vision.min_pixels = 262144
    c.vision.max_pixels = 4194304
    # --dry_run of a Qwen2.5-VL: every row carries one square image of this many pixels,
    # resized into [min_pixels, max_pixels] as the processor does and padded to its patch
    # bucket; its image tokens count inside rollout.max_prompt_len. 0: min_pixels (small
    # images, such as Geometry3K's diagrams, are scaled up to it: 512^2 gives 38 x 38 patches,
    # bucket 1536, 361 image tokens).
    c.vision.dry_run_pixels = 0

    c.data = ml_collections.ConfigDict()
    c.data.kind = "math"  # demo | countdown | geometry3k | math | jsonl
    c.data.path = ""  # file, glob or directory (hub layout data/<split>-*.parquet)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.prompt_field = "problem"  # jsonl field names
    c.data.answer_field = "answer"
    c.data.shuffle = True

    # The embedded tasks (data.kind demo / countdown; the other kinds ignore these sections).
    # Their problems and warm-up policy depend on <task>_data.seed only, not on the run's
    # `seed`, so runs of different seeds start from the same policy on the same problems.
    # Change single fields (c.demo_data.num_train = 30, or c.demo_data.update(...)): assigning
    # a dict replaces the whole section, and validate rejects one with fields missing.
    # demo: the problems (uecjax.data.demo.demo_records arguments).
    c.demo_data = ml_collections.ConfigDict()
    c.demo_data.num_train = 4000  # train-split problems the RL run cycles through (>= 1)
    c.demo_data.num_eval = 128  # held-out test-split problems (>= 1); eval.num_prompts cuts them
    c.demo_data.levels = (1, 2, 3, 4)  # a non-empty tuple of uecjax.data.demo.LEVELS (1..4)
    # "expression" (`3 * 4 - 5 = ?`) | "word" (word problems, about 3x longer prompts); the
    # warm-up policy is trained on this style too.
    c.demo_data.style = "expression"
    c.demo_data.seed = 0  # the problems and the warm-up policy (any integer)
    # demo: the initial policy when model.path is empty (uecjax.demo_model.prepare_demo_policy
    # settings; its seed and style are demo_data's, its prompt format config.prompt's).
    c.demo = ml_collections.ConfigDict()
    # TextConfig fields replacing demo_model.DEMO_MODEL's shape (e.g. hidden_size); {}: none.
    c.demo.model_overrides = ml_collections.ConfigDict()
    # Levels of the warm-up problems: level 3 is left out so that it starts hard (non-empty).
    c.demo.levels = (1, 2, 4)
    c.demo.num_train = 2000  # warm-up problems (>= 1)
    c.demo.sft_steps = 500  # supervised warm-up steps (>= 0; 0: an untrained policy)
    c.demo.batch_size = 32  # warm-up examples per step (>= 1)
    c.demo.learning_rate = 3e-3  # peak AdamW learning rate of the warm-up (> 0)
    # Stop the warm-up once the greedy accuracy on the num_val problems reaches this, checked
    # every 50 steps (in [0, 1]; None: run all sft_steps).
    c.demo.target_accuracy = config_dict.placeholder(float)
    c.demo.num_val = 64  # train-split problems kept out of the warm-up to check it (>= 0; 0: none)
    # Fraction of warm-up solutions whose boxed answer is off by 1-2 (in [0, 1]): a careless
    # teacher, so sampled Pass@1 starts well below Pass@k and RL has something to fix.
    c.demo.slip = 0.0
    c.demo.force = False  # retrain even if WORKDIR/demo_init holds a policy of these settings
    # countdown: the problems (uecjax.data.countdown.countdown_records arguments).
    c.countdown_data = ml_collections.ConfigDict()
    c.countdown_data.num_train = 1500  # train-split problems the RL run cycles through (>= 1)
    c.countdown_data.num_eval = 128  # held-out test-split problems (>= 1)
    c.countdown_data.levels = (1, 2)  # a non-empty tuple of uecjax.data.countdown.LEVELS (1, 2)
    c.countdown_data.seed = 0  # the problems and the warm-up policy (any integer)
    # Percent of the problems (by a hash of their numbers and target) in the test split, 1..99.
    c.countdown_data.heldout_percent = 20
    # countdown: the initial policy when model.path is empty (uecjax.countdown_model.
    # prepare_countdown_policy settings; its seed is countdown_data's, its prompt format
    # config.prompt's).
    c.countdown = ml_collections.ConfigDict()
    # TextConfig fields replacing countdown_model.COUNTDOWN_MODEL's shape; {}: none.
    c.countdown.model_overrides = ml_collections.ConfigDict()
    c.countdown.levels = (1, 2)  # levels of the warm-up problems (non-empty)
    c.countdown.num_train = 1000  # warm-up problems (>= 1)
    c.countdown.samples_per_problem = 4  # warm-up targets per problem (>= 1)
    # Chance that a target on correct_levels is a correct solution, else a random attempt (in
    # [0, 1]); other levels get random attempts only (uecjax.countdown_model: why).
    c.countdown.correct_fraction = 0.4
    c.countdown.correct_levels = (1,)  # a tuple of levels, () for random attempts everywhere
    c.countdown.sft_steps = 1000  # supervised warm-up steps (>= 0)
    c.countdown.batch_size = 64  # warm-up examples per step (>= 1)
    c.countdown.learning_rate = 3e-3  # peak AdamW learning rate of the warm-up (> 0)
    c.countdown.num_val = 64  # train-split problems kept out of the warm-up to check it (>= 0)
    c.countdown.force = False  # retrain even if WORKDIR/countdown_init matches these settings

    c.prompt = ml_collections.ConfigDict()
    c.prompt.template = "think_boxed"  # a key of uecjax.tokenizer.PROMPT_TEMPLATES
    c.prompt.use_chat_template = True  # wrap in the tokenizer's chat template

    c.reward = ml_collections.ConfigDict()
    c.reward.format_weight = 0.1  # r = w_f * format + (1 - w_f) * accuracy (section 1)
    c.reward.timeout_s = 5.0  # per answer; a pathological output scores 0 after this
    c.reward.num_workers = 2  # grading processes
    c.reward.think_prefilled = False  # the chat template already opens <think>

    # Loss hyperparameters: overrides of the method's preset (uecjax.objectives.LossConfig
    # fields, e.g. beta, eps_high, alpha, gate, gate_tau, kappa, lam, aer_rho ...).
    c.loss = ml_collections.ConfigDict()
    c.loss.beta = 0.01

    # Rollout (uecjax.rollout.RolloutConfig fields) on top of the method's rollout preset.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.prompts_per_batch = 8  # B
    c.rollout.group_size = 5  # G
    c.rollout.max_prompt_len = 1024  # P: longer prompts are skipped and counted
    c.rollout.max_new_tokens = 1024  # R
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    # Sampling rounds per batch before it is padded with weightless rows (rounds repeat while
    # retention or dynamic sampling keeps too few rows).
    c.rollout.max_rounds = 8

    # The sampler (rollouts and evaluation): uecjax.sampler.Sampler(batching=, slots=).
    c.sampler = ml_collections.ConfigDict()
    c.sampler.batching = "auto"  # auto | continuous | static (the same tokens, static is slower)
    c.sampler.slots = 0  # continuous batching's decode slots; 0 = min(sequences, 128)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"  # constant | warmup_cosine | linear
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.01
    c.optim.max_grad_norm = 1.0
    c.optim.b1 = 0.9  # AdamW moments
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.state_dtype = ""  # Adam moments: "" (the parameters' dtype) | float32 | bfloat16

    c.train = ml_collections.ConfigDict()
    # Rollout steps: each gives updates_per_rollout x epochs optimizer updates (the learning-rate
    # schedule counts those; replay updates come on top and do not advance it).
    c.train.steps = 100
    c.train.micro_batches = 1  # gradient accumulation within an update; its rows must divide by it (and the mesh)
    # Optimizer updates per rollout batch: its B * G rows are split into this many disjoint
    # mini-batches, one update each, PPO-style (section 4a); B * G must divide by it.
    c.train.updates_per_rollout = 1
    c.train.epochs = 1  # passes over the rollout batch, rows reshuffled between them (run's seed)
    c.train.chunk_size = 1024  # tokens per lm-head chunk in log-prob / entropy passes
    # Sequence packing (uecjax.packing): the scoring and training forward passes run on the
    # rows' real tokens packed first-fit into rows of tokens_per_row slots (0: the padded row
    # length, prompt + response - 1) with segment ids; same log-probs and gradients, less
    # padding.
    c.train.pack = False
    c.train.tokens_per_row = 0
    # --dry_run with pack: the share of the padded rows' slots the sequences fill (mean
    # prompt + response over prompt + response length), which sets the packed row count.
    c.train.dry_run_fill = 0.5
    c.train.log_every = 1
    c.train.eval_every = 20  # 0: only at the start and the end
    c.train.checkpoint_every = 20
    c.train.keep_checkpoints = 3
    c.train.export_hf = True  # write the final policy as a Hugging Face checkpoint

    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 256  # held-out prompts per evaluation (0: all)
    c.eval.n = 8  # samples per prompt for Pass@k
    c.eval.temperature = 1.0
    c.eval.top_p = 1.0
    c.eval.max_new_tokens = 1024
    c.eval.batch_prompts = 32

    # Mesh (data, fsdp, tensor) over all processes' devices; -1 takes the remaining devices.
    # tensor must divide the attention heads, KV heads and MLP width, fsdp the hidden size.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0  # use the first N devices (0: all of them; multi-process runs: 0)
    return c


def validate(c: ml_collections.ConfigDict, *, dry_run: bool = False) -> None:
    """Raises ConfigValueError naming the first bad field: also for what the method's
    LossConfig, RolloutConfig, OptimConfig and UpdatePlan (built here by `derive`, as `train`
    builds them) reject, and in the embedded tasks' sections (demo, demo_data, countdown,
    countdown_data), whatever data.kind is. dry_run: data and checkpoint paths are not needed
    (a shape from model.preset or model.path's config.json is)."""
    def bad(field, value, why):
        raise ConfigValueError(f"config.{field}={value!r}: {why}")

    if c.method not in METHODS:
        bad("method", c.method, f"choose from {sorted(METHODS)}")
    if c.data.kind not in DATA_KINDS:
        bad("data.kind", c.data.kind, f"choose from {DATA_KINDS}")
    if c.data.kind not in EMBEDDED_KINDS and not c.data.path and not dry_run:
        bad("data.path", c.data.path, "set it to the dataset directory or file")
    if c.data.kind not in EMBEDDED_KINDS and not c.model.path and not (dry_run and c.model.preset):
        bad("model.path", c.model.path, "set it to a Hugging Face checkpoint directory"
            + (" (or its config.json), or set config.model.preset" if dry_run else ""))
    _check_tasks(c)
    if c.model.remat not in REMAT_MODES + (True, False):
        bad("model.remat", c.model.remat, f"choose from {REMAT_MODES}")
    if c.model.attention not in ATTENTION_IMPLEMENTATIONS:
        bad("model.attention", c.model.attention, f"choose from {ATTENTION_IMPLEMENTATIONS}")
    for field in ("model.dtype", "model.param_dtype"):
        if c.model[field.split(".")[1]] not in ("float32", "bfloat16"):
            bad(field, c.model[field.split(".")[1]], "use float32 or bfloat16")
    lora_from_config(c)  # a bad model.lora.* is an error naming the field
    if c.sampler.batching not in SAMPLER_BATCHING:
        bad("sampler.batching", c.sampler.batching, f"choose from {SAMPLER_BATCHING}")
    if not isinstance(c.sampler.slots, int) or c.sampler.slots < 0:
        bad("sampler.slots", c.sampler.slots, "must be an integer >= 0 (0: the default)")
    if c.optim.state_dtype not in STATE_DTYPES:
        bad("optim.state_dtype", c.optim.state_dtype, f"choose from {STATE_DTYPES} ('' = as the parameters)")
    if c.model.preset and c.model.preset not in PRESETS:
        bad("model.preset", c.model.preset, f"choose from {sorted(PRESETS)}")
    if c.prompt.template not in PROMPT_TEMPLATES:
        bad("prompt.template", c.prompt.template, f"choose from {sorted(PROMPT_TEMPLATES)}")
    if not 0.0 <= c.reward.format_weight <= 1.0:
        bad("reward.format_weight", c.reward.format_weight, "must be in [0, 1]")
    for field in ("train.steps", "train.micro_batches", "train.updates_per_rollout",
                  "train.epochs", "train.chunk_size", "eval.n",
                  "eval.max_new_tokens", "eval.batch_prompts", "reward.num_workers"):
        section, name = field.split(".")
        value = c[section][name]
        if not isinstance(value, int) or value < 1:
            bad(field, value, "must be an integer >= 1")
    if not isinstance(c.train.dry_run_fill, (int, float)) or not 0 < c.train.dry_run_fill <= 1:
        bad("train.dry_run_fill", c.train.dry_run_fill, "must be in (0, 1]")
    if not isinstance(c.train.tokens_per_row, int) or c.train.tokens_per_row < 0:
        bad("train.tokens_per_row", c.train.tokens_per_row, "must be an integer >= 0 (0: the row length)")
    if c.train.tokens_per_row and c.train.tokens_per_row < c.rollout.max_prompt_len + c.rollout.max_new_tokens - 1:
        bad("train.tokens_per_row", c.train.tokens_per_row,
            f"must hold the longest sequence, rollout.max_prompt_len + rollout.max_new_tokens - 1 = "
            f"{c.rollout.max_prompt_len + c.rollout.max_new_tokens - 1} (or 0)")
    for field in ("train.eval_every", "train.checkpoint_every", "eval.num_prompts"):
        section, name = field.split(".")
        if c[section][name] < 0:
            bad(field, c[section][name], "must be >= 0")
    if c.optim.learning_rate <= 0:
        bad("optim.learning_rate", c.optim.learning_rate, "must be > 0")
    if c.reward.timeout_s <= 0:
        bad("reward.timeout_s", c.reward.timeout_s, "must be > 0")
    if not isinstance(c.vision.min_pixels, int) or c.vision.min_pixels < 1:
        bad("vision.min_pixels", c.vision.min_pixels, "must be an integer >= 1")
    if not isinstance(c.vision.max_pixels, int) or c.vision.max_pixels < c.vision.min_pixels:
        bad("vision.max_pixels", c.vision.max_pixels,
            f"must be an integer >= vision.min_pixels={c.vision.min_pixels}")
    if not isinstance(c.vision.dry_run_pixels, int) or c.vision.dry_run_pixels < 0:
        bad("vision.dry_run_pixels", c.vision.dry_run_pixels, "must be an integer >= 0 (0: vision.min_pixels)")
    derived = derive(c)
    rollout, plan = derived.rollout_cfg, derived.update_plan
    if rollout.batch_rows % plan.updates_per_rollout:
        bad("train.updates_per_rollout", plan.updates_per_rollout,
            f"must divide the rollout batch, config.rollout.prompts_per_batch * "
            f"config.rollout.group_size = {rollout.prompts_per_batch} * {rollout.group_size} = "
            f"{rollout.batch_rows} rows, into equal mini-batches; change either")


def lora_from_config(c: ml_collections.ConfigDict) -> LoraSpec | None:
    """config.model.lora as a LoraSpec (None: rank 0, full fine-tuning); a bad field is a
    ConfigValueError naming it."""
    lora = c.model.lora
    if not isinstance(lora.rank, int) or lora.rank < 0:
        raise ConfigValueError(f"config.model.lora.rank={lora.rank!r}: must be an integer >= 0 (0: no LoRA)")
    if not lora.rank:
        return None
    targets = tuple(t.strip() for t in str(lora.targets).split(",") if t.strip())
    try:
        return LoraSpec(rank=lora.rank, alpha=float(lora.alpha), targets=targets,
                        dropout=float(lora.dropout))
    except LoraError as e:
        field = next(f for f in ("alpha", "targets", "dropout") if str(e).startswith(f"lora {f}="))
        raise ConfigValueError(f"config.model.lora.{field}={lora[field]!r}: "
                               + str(e).split(": ", 1)[1]) from None


@dataclasses.dataclass(frozen=True)
class Derived:
    """The typed settings a run builds from its config (`derive`)."""

    loss_cfg: LossConfig  # the method's loss preset with config.loss on top
    rollout_cfg: RolloutConfig  # the method's rollout preset with config.rollout on top
    optim_cfg: OptimConfig  # config.optim; total_steps: the run's scheduled updates
    update_plan: UpdatePlan  # config.train.updates_per_rollout x epochs, shuffled by config.seed


def derive(cfg: ml_collections.ConfigDict, frozen: tuple[str, ...] = ()) -> Derived:
    """The LossConfig, RolloutConfig, OptimConfig and UpdatePlan of a run, as `validate`
    checks them: what they reject is a ConfigValueError naming config.<section>.<field>.

    The learning-rate schedule counts optimizer updates on fresh rollouts: total_steps =
    max(train.steps * updates_per_rollout * epochs, optim.warmup_steps + 1) unless config.optim
    sets it. frozen: top-level parameter groups that do not train (("visual",) for a Qwen2.5-VL
    with model.freeze_vision); it depends on the model, so `validate` derives with none.
    """
    loss = _build_section("loss", lambda **kw: loss_config(cfg.method, **kw), cfg.loss.to_dict(),
                          LossConfig, elsewhere={"method": "config.method"})
    rollout = _build_section("rollout", lambda **kw: rollout_config(cfg.method, **kw),
                             cfg.rollout.to_dict(), RolloutConfig)
    plan = _build_section("train", lambda **kw: UpdatePlan(seed=cfg.seed, **kw),
                          {"updates_per_rollout": cfg.train.updates_per_rollout,
                           "epochs": cfg.train.epochs}, UpdatePlan,
                          elsewhere={"seed": "config.seed"})
    optim = _build_section("optim", lambda **kw: OptimConfig(
        **{"total_steps": max(cfg.train.steps * plan.total, cfg.optim.warmup_steps + 1),
           **kw, "frozen": tuple(frozen)}),
        cfg.optim.to_dict(), OptimConfig, elsewhere={"frozen": "config.model.freeze_vision"})
    return Derived(loss_cfg=loss, rollout_cfg=rollout, optim_cfg=optim, update_plan=plan)


# Checks of single fields: (predicate, what is allowed); a field's type is checked first.
def _at_least(low: int):
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
            f"must be an integer >= {low}")


def _levels(known, *, empty: bool = False):
    return (lambda v: isinstance(v, (tuple, list)) and (empty or len(v) > 0)
            and all(lv in known for lv in v),
            f"choose a {'' if empty else 'non-empty '}tuple from {sorted(known)}")


_UNIT = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_POSITIVE = (lambda v: v > 0, "must be > 0")


def _check_tasks(c: ml_collections.ConfigDict) -> None:
    """The embedded tasks' sections (demo_data, demo, countdown_data, countdown), whatever
    data.kind is (their defaults are valid): each complete, with known fields of the right
    type and values their generators and warm-ups accept."""
    base = base_config()
    styles = ("expression", "word")
    _check_task_section(c, "demo_data", base.demo_data.to_dict(), "base_config().demo_data", {
        "num_train": _at_least(1), "num_eval": _at_least(1), "levels": _levels(demo.LEVELS),
        "style": (lambda v: v in styles, f"choose from {styles}")})
    _check_task_section(c, "countdown_data", base.countdown_data.to_dict(),
                        "base_config().countdown_data", {
                            "num_train": _at_least(1), "num_eval": _at_least(1),
                            "levels": _levels(countdown.LEVELS),
                            "heldout_percent": (lambda v: 0 < v < 100, "must be in 1..99 (the "
                                                "percent of the problems in the test split)")})
    warmup = {"num_train": _at_least(1), "sft_steps": _at_least(0), "batch_size": _at_least(1),
              "learning_rate": _POSITIVE, "num_val": _at_least(0)}
    # The preparations' other arguments come from other fields (`setup.load_policy`).
    prompt = {"template": "config.prompt.template",
              "use_chat_template": "config.prompt.use_chat_template"}
    _check_task_section(
        c, "demo", _settings(prepare_demo_policy), "prepare_demo_policy", {
            **warmup, "levels": _levels(demo.LEVELS), "slip": _UNIT,
            "target_accuracy": (lambda v: v is None or _UNIT[0](v),
                                "must be in [0, 1], or None to run all sft_steps")},
        elsewhere={"seed": "config.demo_data.seed", "style": "config.demo_data.style", **prompt},
        shape=DEMO_MODEL)
    _check_task_section(
        c, "countdown", _settings(prepare_countdown_policy), "prepare_countdown_policy", {
            **warmup, "levels": _levels(countdown.LEVELS), "samples_per_problem": _at_least(1),
            "correct_fraction": _UNIT, "correct_levels": _levels(countdown.LEVELS, empty=True)},
        elsewhere={"seed": "config.countdown_data.seed", **prompt}, shape=COUNTDOWN_MODEL)


def _settings(prepare) -> dict:
    """{name: default} of the keyword settings of a policy preparation."""
    return {name: p.default for name, p in inspect.signature(prepare).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name != "log"}


def _check_task_section(c, section: str, defaults: dict, what: str, rules: dict,
                        elsewhere: dict[str, str] | None = None, shape: dict | None = None) -> None:
    """config.<section>: complete (every field of `defaults` but `elsewhere`'s), each field of
    its default's type and passing its rule; shape: the tiny model's TextConfig fields, which
    the section's model_overrides replace."""
    block = c.get(section)
    how = f"set single fields (c.{section}.num_train = ...) or c.{section}.update(...)"
    if not isinstance(block, ml_collections.ConfigDict):
        raise ConfigValueError(f"config.{section}={block!r}: must be the section of "
                               f"base_config(); {how}")
    elsewhere = elsewhere or {}
    values = block.to_dict()
    _check_fields(section, values, defaults, what, elsewhere)
    missing = sorted(set(defaults) - set(elsewhere) - set(values))
    if missing:
        raise ConfigValueError(f"config.{section}.{missing[0]}: missing (was the section replaced "
                               f"by a dict without {missing}?); {how}, which keep "
                               "base_config()'s other fields")
    for name, (ok, why) in rules.items():
        if not ok(values[name]):
            raise ConfigValueError(f"config.{section}.{name}={values[name]!r}: {why}")
    if shape is not None:
        _check_model_overrides(f"{section}.model_overrides", values["model_overrides"], shape)


def _check_model_overrides(field: str, overrides, shape: dict) -> None:
    """TextConfig fields replacing `shape`'s, of their types, giving a valid TextConfig."""
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ConfigValueError(f"config.{field}={overrides!r}: must be a dict of TextConfig "
                               f"fields, e.g. dict(hidden_size=64)")
    if "vocab_size" in overrides:
        raise ConfigValueError(f"config.{field}.vocab_size: the character tokenizer sets it; "
                               "remove it")
    fields = {**{f.name: f.default for f in dataclasses.fields(TextConfig)}, **shape}
    del fields["vocab_size"]
    _check_fields(field, overrides, fields, "TextConfig")
    try:  # the vocabulary size does not matter to TextConfig's checks
        TextConfig(vocab_size=1, **{**shape, **overrides})
    except (ValueError, TypeError) as e:  # models.config.ConfigError is a ValueError
        raise ConfigValueError(f"config.{field}: {e}") from None


# Prefixes under which LossConfig, RolloutConfig, OptimConfig and UpdatePlan name a field in
# their errors.
_CLASS_PREFIX = re.compile(r"^(?:LossConfig|OptimConfig|rollout|train)\.")


def _build_section(section: str, build, values: dict, cls, elsewhere: dict[str, str] | None = None):
    """build(**values), with an unknown field, a value of the wrong type or one that `cls`
    rejects raised as a ConfigValueError naming config.<section>.<field>. elsewhere: fields of
    `cls` that another config field sets."""
    _check_fields(section, values, {f.name: f.default for f in dataclasses.fields(cls)},
                  cls.__name__, elsewhere)
    try:
        return build(**values)
    except (ValueError, TypeError) as e:  # LossConfigError and OptimConfigError are ValueErrors
        message = str(e)
        if _CLASS_PREFIX.match(message):
            raise ConfigValueError(_CLASS_PREFIX.sub(f"config.{section}.", message)) from None
        raise ConfigValueError(f"config.{section}: {message}") from None


def _check_fields(section: str, values: dict, fields: dict, what: str,
                  elsewhere: dict[str, str] | None = None) -> None:
    """Every one of `values` is a field of `fields` ({name: default}; `what` takes them), of
    its default's type. elsewhere: fields that another config field sets."""
    elsewhere = elsewhere or {}
    for name, value in values.items():
        if name in elsewhere:
            raise ConfigValueError(f"config.{section}.{name}: set {elsewhere[name]} instead")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise ConfigValueError(
                f"config.{section}.{name}: {what} has no such field"
                + (f" (did you mean {close[0]}?)" if close else "")
                + f"; remove it from the config file or use one of "
                f"{sorted(set(fields) - set(elsewhere))}")
        if not _same_kind(value, fields[name]):
            raise ConfigValueError(f"config.{section}.{name}={value!r}: must be of type "
                                   f"{type(fields[name]).__name__}, as its default "
                                   f"{fields[name]!r}")


def _same_kind(value, default) -> bool:
    """Whether `value` has the type of a field whose default is `default` (an int passes for a
    float; a field without a default or with None takes anything)."""
    if default is None or default is dataclasses.MISSING:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and (isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))
