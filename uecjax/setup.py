"""What a run needs before its first step, built from the config: the input checks, the mesh,
the policy (model, tokenizer, image processor: `load_policy`, for training and evaluation;
`model_config`, its shape without weights, for the dry run), the records and the prompts."""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Callable

import jax
import ml_collections

from uecjax.config import DATA_KINDS, EMBEDDED_KINDS, ConfigValueError, lora_from_config
from uecjax.countdown_model import COUNTDOWN_MODEL, prepare_countdown_policy
from uecjax.data import (DataNotFoundError, Fields, countdown_source, demo_source,
                         geometry3k_source, load_source, make_dataset, make_iterator, math_source,
                         shard_batches)
from uecjax.data.records import SkipCounter
from uecjax.data.sources import GEOMETRY3K_HINT, MATH_HINT
from uecjax.demo_model import DEMO_MODEL, prepare_demo_policy
from uecjax.models import CheckpointError, TextConfig, VLConfig, from_pretrained
from uecjax.models.config import model_config_from_hf, read_hf_config
from uecjax.models.lora_init import add_lora
from uecjax.models.presets import preset
from uecjax.parallel.mesh import ShardingError, check_model_mesh, make_mesh, model_sharding_fn
from uecjax.rollout import Prompt
from uecjax.tokenizer import char_tokenizer, load_tokenizer
from uecjax.vision_inputs import (ImageError, ImageProcessor, load_image_processor, render_record,
                                  vl_chat_template)

MODEL_DOWNLOAD = "huggingface-cli download {repo} --local-dir {path}"
DATA_DOWNLOAD = "huggingface-cli download {repo} --repo-type dataset --local-dir {path}"
DATA_REPOS = {"geometry3k": GEOMETRY3K_HINT.hf_repo, "math": MATH_HINT.hf_repo}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def check_inputs(cfg: ml_collections.ConfigDict) -> None:
    """The checkpoint and data paths exist; else one error naming every missing path with the
    command that downloads it (run before anything slow)."""
    missing_model, problems = False, []
    path = cfg.model.path
    if (path or cfg.data.kind not in EMBEDDED_KINDS) and not os.path.isdir(path):
        missing_model = True
        problems.append(f"config.model.path={path!r}: checkpoint directory not found. Download it with\n  "
                        + MODEL_DOWNLOAD.format(repo=cfg.model.hub_repo or "<hub repository>",
                                                path=path or "<dir>"))
    data = cfg.data.path
    # Globs and {split} patterns are resolved (with their own messages) when the data loads.
    if cfg.data.kind not in EMBEDDED_KINDS and not glob.has_magic(data) and "{split}" not in data \
            and not os.path.exists(data):
        repo = DATA_REPOS.get(cfg.data.kind)
        problems.append(f"config.data.path={data!r}: not found. " + (
            "Download it with\n  " + DATA_DOWNLOAD.format(repo=repo, path=data) if repo else
            "Point it at a .parquet/.jsonl file, a glob, or a directory with <split>-*.parquet files."))
    if problems:
        text = "\n".join(problems) + "\n(download on a machine with internet access; copy the directories here)"
        raise (CheckpointError if missing_model else DataNotFoundError)(text)


def run_mesh(cfg: ml_collections.ConfigDict, devices=None):
    """The (data, fsdp, tensor) mesh of config.mesh over all processes' devices (or `devices`)."""
    if devices is None and cfg.mesh.num_devices:
        if jax.process_count() > 1 and cfg.mesh.num_devices != jax.device_count():
            raise ShardingError(
                f"config.mesh.num_devices={cfg.mesh.num_devices}: a multi-process run uses all "
                f"{jax.device_count()} devices of its {jax.process_count()} processes; set it to 0")
        devices = jax.devices()[: cfg.mesh.num_devices]
    return make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices=devices)


def model_config(cfg: ml_collections.ConfigDict):
    """The model's config without loading weights: model.preset, else model.path (a
    checkpoint directory or its config.json, read as `load_policy` reads it: VLConfig for a
    Qwen2.5-VL, the decoder's TextConfig for other checkpoints), else the embedded task's tiny
    model; with the run's dtype, param_dtype and remat."""
    numerics = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                    attention=cfg.model.attention)
    if cfg.model.preset:
        return preset(cfg.model.preset, **numerics)
    if cfg.model.path:
        if not os.path.exists(cfg.model.path):
            raise CheckpointError(f"config.model.path={cfg.model.path!r}: not found; give a "
                                  "checkpoint directory or its config.json, or config.model.preset")
        hf_config = read_hf_config(cfg.model.path)
        return model_config_from_hf(hf_config, source=cfg.model.path,
                                    language_model_only=_text_only(hf_config), **numerics)
    shape, settings = ((COUNTDOWN_MODEL, cfg.countdown) if cfg.data.kind == "countdown"
                       else (DEMO_MODEL, cfg.demo))
    shape = {**shape, **dict(settings.model_overrides)}
    return TextConfig(vocab_size=len(char_tokenizer()), **{**shape, **numerics})


def _text_only(hf_config: dict) -> bool:
    """Other VL families (Qwen2-VL) train their decoder alone, on the prompts' text."""
    return hf_config.get("model_type") != "qwen2_5_vl"


@dataclasses.dataclass
class Policy:
    model: object  # uecjax.models.Qwen2 or Qwen2_5_VL, its parameters on the mesh
    tokenizer: object  # a transformers tokenizer (the VL chat template set for a Qwen2.5-VL)
    image_processor: ImageProcessor | None  # a Qwen2.5-VL's; None for a text policy
    source: str = ""  # the directory the weights came from (a LoRA adapter's base model)

    @property
    def vl_config(self) -> VLConfig | None:
        return self.model.config if isinstance(self.model.config, VLConfig) else None


def load_policy(cfg: ml_collections.ConfigDict, mesh, *, log: Callable[[str], None] = print,
                workdir: str | None = None, checkpoint: str | None = None,
                lora: bool = True) -> Policy:
    """The policy on `mesh`: from `checkpoint` (a Hugging Face layout directory, e.g. a run's
    export), else config.model.path, else (with a workdir, data.kind an embedded task) the
    task's own tiny policy, prepared in workdir. Qwen2.5-VL loads as `Qwen2_5_VL` (images reach
    the vision tower), Qwen2 / Qwen2.5 and other VL families' decoders as `Qwen2`.

    The mesh is checked against the model's shape first (`check_model_mesh`): an uneven split
    is an error naming config.mesh.*, a vocabulary fallback a warning (`log`). Tokenizer and
    image processor come from the checkpoint, else from config.model.path (an export made by
    an older version may lack them). With config.model.lora.rank > 0 (and `lora`), the
    policy gets fresh LoRA adapters (B = 0: the loaded model's outputs), placed on the mesh.
    """
    policy = _load_policy(cfg, mesh, log, workdir, checkpoint)
    spec = lora_from_config(cfg) if lora else None
    if spec is not None:
        add_lora(policy.model, spec, seed=cfg.seed, mesh=mesh)
        log(f"LoRA: rank {spec.rank}, alpha {spec.alpha:g} on {','.join(spec.targets)}; "
            "base weights frozen")
    return policy


def _load_policy(cfg, mesh, log, workdir, checkpoint) -> Policy:
    path = checkpoint or cfg.model.path
    if not path:
        if cfg.data.kind in EMBEDDED_KINDS and workdir is not None:
            return _embedded_policy(cfg, mesh, workdir, log)
        raise CheckpointError("no checkpoint: pass --checkpoint=DIR (an HF-layout directory, as "
                              "the training loop exports) or set config.model.path")
    if checkpoint is None:
        check_inputs(cfg)  # the download commands for what is missing
    _check_hf_dir(path, "--checkpoint" if checkpoint else "config.model.path")
    hf_config = read_hf_config(path)
    text_only = _text_only(hf_config)
    config = model_config_from_hf(hf_config, source=os.path.join(path, "config.json"),
                                  language_model_only=text_only)
    for warning in check_model_mesh(config, mesh):
        log(f"warning: {warning}")
    model = from_pretrained(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=cfg.model.remat, attention=cfg.model.attention, sharding_fn=model_sharding_fn(mesh, config),
                            language_model_only=text_only)
    sources = [path] + ([cfg.model.path] if cfg.model.path and cfg.model.path != path else [])
    tokenizer_dir = _first_with(sources, TOKENIZER_FILES)
    if tokenizer_dir is None:
        raise CheckpointError(
            f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {' or '.join(sources)}; save "
            "the tokenizer next to the weights (tokenizer.save_pretrained(DIR))")
    tokenizer = load_tokenizer(tokenizer_dir)
    processor = None
    if not text_only:
        template = vl_chat_template(tokenizer_dir)  # the processor's template places the images
        if template:
            tokenizer.chat_template = template
        processor = load_image_processor(_first_with(sources, ("preprocessor_config.json",)),
                                         model.config.vision, min_pixels=cfg.vision.min_pixels,
                                         max_pixels=cfg.vision.max_pixels)
        log(f"Qwen2.5-VL policy: vision tower {'frozen' if cfg.model.freeze_vision else 'trained'}")
    return Policy(model, tokenizer, processor, source=path)


def _check_hf_dir(path: str, where: str) -> None:
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{where}={path}: directory not found. Pass an HF-layout directory (config.json, "
            "*.safetensors and tokenizer files), such as the final policy the training loop "
            "exports or, for the demo, WORKDIR/demo_init.")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"{where}={path}: no config.json there. It must be a Hugging Face layout "
            "directory (config.json + *.safetensors), not an orbax training checkpoint.")


def _first_with(dirs: list[str], files: tuple[str, ...]) -> str | None:
    """The first directory holding one of `files`."""
    return next((d for d in dirs if any(os.path.exists(os.path.join(d, f)) for f in files)), None)


def _embedded_policy(cfg: ml_collections.ConfigDict, mesh, workdir: str, log) -> Policy:
    """The demo's or the countdown task's tiny policy, warmed up in workdir (or reused)."""
    task, init = (("countdown", "countdown_init") if cfg.data.kind == "countdown"
                  else ("demo", "demo_init"))
    if jax.process_count() > 1:  # every process would train and write workdir/<init>
        raise CheckpointError(
            f"config.model.path='': the {task} policy is prepared by a single process; run "
            f"the {task} config once on one process (it writes WORKDIR/{init}) and pass "
            f"--config.model.path=WORKDIR/{init} to the multi-process run")
    for warning in check_model_mesh(model_config(cfg), mesh):
        log(f"warning: {warning}")
    # The warm-up must see the prompts the RL run will render.
    prompt = dict(template=cfg.prompt.template, use_chat_template=cfg.prompt.use_chat_template)
    if task == "countdown":
        model, tokenizer, path = prepare_countdown_policy(
            workdir, seed=cfg.countdown_data.seed, log=log, **prompt, **cfg.countdown.to_dict())
    else:
        model, tokenizer, path = prepare_demo_policy(
            workdir, seed=cfg.demo_data.seed, style=cfg.demo_data.style, log=log, **prompt,
            **cfg.demo.to_dict())
    log(f"{task} policy: {path}")
    return Policy(model, tokenizer, None, source=path)


def _source(cfg: ml_collections.ConfigDict, split: str, *, train: bool):
    kind = cfg.data.kind
    if kind == "demo":
        num = cfg.demo_data.num_train if train else cfg.demo_data.num_eval
        return demo_source("train" if train else "test", num, seed=cfg.demo_data.seed,
                           levels=tuple(cfg.demo_data.levels), style=cfg.demo_data.style)
    if kind == "countdown":  # records whose answers carry the numbers (countdown_source)
        d = cfg.countdown_data
        return countdown_source("train" if train else "test",
                                d.num_train if train else d.num_eval, seed=d.seed,
                                levels=tuple(d.levels),
                                heldout_percent=d.heldout_percent)
    if kind == "geometry3k":
        return geometry3k_source(cfg.data.path, split)
    if kind == "math":
        return math_source(cfg.data.path, split)
    fields = Fields(prompt=cfg.data.prompt_field, answer=cfg.data.answer_field)
    return load_source(cfg.data.path, split, fields=fields, name="jsonl")


def make_records(cfg: ml_collections.ConfigDict, split: str, *, train: bool,
                 shard: tuple[int, int] | None = None, num_prompts: int | None = None):
    """Training: (source, checkpointable endless shuffled iterator); eval: a list of records.

    The training iterator reads only this process's block of every global batch of
    config.rollout.prompts_per_batch records (`shard` = (index, count), by default
    (jax.process_index(), jax.process_count())); with one process, the whole stream. The
    eval list holds the first num_prompts records (default config.eval.num_prompts; 0: all).
    """
    if cfg.data.kind not in DATA_KINDS:
        raise ConfigValueError(f"config.data.kind={cfg.data.kind!r}: choose from {DATA_KINDS}")
    source = _source(cfg, split, train=train)
    if train:
        index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
        dataset = make_dataset(source, seed=cfg.seed, shuffle=cfg.data.shuffle, num_epochs=None)
        dataset = shard_batches(dataset, cfg.rollout.prompts_per_batch, index, count)
        return source, make_iterator(dataset)
    records = list(make_dataset(source, shuffle=False, num_epochs=1))
    num = cfg.eval.num_prompts if num_prompts is None else num_prompts
    return records[:num] if num else records


def prompt_stream(records, tokenizer, cfg: ml_collections.ConfigDict, max_prompt_len: int,
                  skipped: SkipCounter | None = None, processor: ImageProcessor | None = None):
    """Rendered prompts from records, with their images for a VL policy (`processor`);
    prompts longer than max_prompt_len (image tokens included) and images that fail to
    preprocess are skipped and counted."""
    skipped = skipped if skipped is not None else SkipCounter()
    for record in records:
        try:
            ids, images = render_record(tokenizer, record, template=cfg.prompt.template,
                                        use_chat_template=cfg.prompt.use_chat_template,
                                        image_processor=processor)
        except ImageError as e:
            skipped.skip("prompts", record.id, "bad_image", str(e))
            continue
        if len(ids) > max_prompt_len:
            skipped.skip("prompts", record.id, "prompt_too_long",
                         f"{len(ids)} tokens > rollout.max_prompt_len={max_prompt_len}")
            continue
        yield Prompt(ids=ids, answer=record.answer, choices=tuple(record.choices), images=images)
