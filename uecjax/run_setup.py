"""What a run needs before its first step: the policy and tokenizer, the records, the prompts."""

from __future__ import annotations

import glob
import os

import jax
import ml_collections

from uecjax.config import EMBEDDED_KINDS
from uecjax.data import (DataNotFoundError, Fields, countdown_source, demo_source,
                         geometry3k_source, load_source, make_dataset, make_iterator, math_source,
                         shard_batches)
from uecjax.data.records import SkipCounter
from uecjax.data.sources import GEOMETRY3K_HINT, MATH_HINT
from uecjax.models import CheckpointError, VLConfig, from_pretrained
from uecjax.models.config import model_config_from_hf, read_hf_config
from uecjax.rollout import Prompt
from uecjax.parallel.hosts import allgather_objects
from uecjax.parallel.mesh import ShardingError, check_model_mesh, make_mesh, model_sharding_fn
from uecjax.tokenizer import load_tokenizer
from uecjax.vision_inputs import (ImageError, ImageProcessor, load_image_processor, render_record,
                                  vl_chat_template)

MODEL_DOWNLOAD = "huggingface-cli download {repo} --local-dir {path}"
DATA_DOWNLOAD = "huggingface-cli download {repo} --repo-type dataset --local-dir {path}"
DATA_REPOS = {"geometry3k": GEOMETRY3K_HINT.hf_repo, "math": MATH_HINT.hf_repo}


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
    model (the countdown task's for data.kind "countdown", else the demo's); with the run's
    dtype, param_dtype and remat."""
    from uecjax.models.config import TextConfig
    from uecjax.models.presets import preset

    numerics = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    if cfg.model.preset:
        return preset(cfg.model.preset, **numerics)
    if cfg.model.path:
        if not os.path.exists(cfg.model.path):
            raise CheckpointError(f"config.model.path={cfg.model.path!r}: not found; give a "
                                  "checkpoint directory or its config.json, or config.model.preset")
        hf_config = read_hf_config(cfg.model.path)
        return model_config_from_hf(hf_config, source=cfg.model.path,
                                    language_model_only=_text_only(hf_config), **numerics)
    from uecjax.tokenizer import char_tokenizer

    if cfg.data.kind == "countdown":
        from uecjax.countdown_model import COUNTDOWN_MODEL as shape

        settings = cfg.get("countdown") or {}
    else:
        from uecjax.demo_model import DEMO_MODEL as shape

        settings = cfg.get("demo") or {}
    shape = {**shape, **dict(settings.get("model_overrides") or {})}
    return TextConfig(vocab_size=len(char_tokenizer()), **{**shape, **numerics})


def _text_only(hf_config: dict) -> bool:
    """Other VL families (Qwen2-VL) train their decoder alone, on the prompts' text."""
    return hf_config.get("model_type") != "qwen2_5_vl"


def load_policy(cfg: ml_collections.ConfigDict, workdir: str, mesh, logger):
    """(model, tokenizer): an embedded task's self-prepared policy (the demo's, the countdown
    task's) when config.model.path is empty, or a Hugging Face checkpoint:
    Qwen2.5-VL as `Qwen2_5_VL` (images reach the vision tower), Qwen2 / Qwen2.5 as `Qwen2`.

    The mesh is checked against the model's shape first (`check_model_mesh`): a split that
    cannot be even is an error naming config.mesh.*, a vocabulary fallback a logged warning.
    """
    if cfg.data.kind in EMBEDDED_KINDS and not cfg.model.path:
        task, init = (("countdown", "countdown_init") if cfg.data.kind == "countdown"
                      else ("demo", "demo_init"))
        if jax.process_count() > 1:  # every process would train and write workdir/<init>
            raise CheckpointError(
                f"config.model.path='': the {task} policy is prepared by a single process; run "
                f"the {task} config once on one process (it writes WORKDIR/{init}) and pass "
                f"--config.model.path=WORKDIR/{init} to the multi-process run")
        for warning in check_model_mesh(model_config(cfg), mesh):
            logger.text(f"warning: {warning}")

        # The warm-up must see the prompts the RL run will render.
        if task == "countdown":
            from uecjax.countdown_model import prepare_countdown_policy

            settings = cfg.get("countdown")
            model, tokenizer, path = prepare_countdown_policy(
                workdir, seed=cfg.countdown_data.get("seed", 0), template=cfg.prompt.template,
                use_chat_template=cfg.prompt.use_chat_template, log=logger.text,
                **(settings.to_dict() if settings is not None else {}))
        else:
            from uecjax.demo_model import prepare_demo_policy

            model, tokenizer, path = prepare_demo_policy(
                workdir, seed=cfg.demo_data.get("seed", 0), style=cfg.demo_data.style, template=cfg.prompt.template,
                use_chat_template=cfg.prompt.use_chat_template, log=logger.text, **cfg.demo.to_dict())
        logger.text(f"{task} policy: {path}")
        return model, tokenizer
    check_inputs(cfg)
    path = cfg.model.path
    hf_config = read_hf_config(path)
    text_only = _text_only(hf_config)
    config = model_config_from_hf(hf_config, source=os.path.join(path, "config.json"),
                                  language_model_only=text_only)
    for warning in check_model_mesh(config, mesh):
        logger.text(f"warning: {warning}")
    model = from_pretrained(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=cfg.model.remat, sharding_fn=model_sharding_fn(mesh, config),
                            language_model_only=text_only)
    tokenizer = load_tokenizer(path)
    if not text_only:
        template = vl_chat_template(path)  # the processor's template places the images
        if template:
            tokenizer.chat_template = template
        logger.text(f"Qwen2.5-VL policy: vision tower {'frozen' if cfg.model.freeze_vision else 'trained'}")
    return model, tokenizer


def image_processor(cfg: ml_collections.ConfigDict, model) -> ImageProcessor | None:
    """The image processor of a Qwen2.5-VL policy (None for a text model), with the config's
    pixel bounds."""
    if not isinstance(model.config, VLConfig):
        return None
    return load_image_processor(cfg.model.path or None, model.config.vision,
                                min_pixels=cfg.vision.min_pixels, max_pixels=cfg.vision.max_pixels)


def _source(cfg: ml_collections.ConfigDict, split: str, *, train: bool):
    kind = cfg.data.kind
    if kind == "demo":
        num = cfg.demo_data.num_train if train else cfg.demo_data.num_eval
        return demo_source("train" if train else "test", num, seed=cfg.demo_data.get("seed", 0),
                           levels=tuple(cfg.demo_data.levels), style=cfg.demo_data.style)
    if kind == "countdown":  # records whose answers carry the numbers (countdown_source)
        d = cfg.countdown_data
        return countdown_source("train" if train else "test",
                                d.num_train if train else d.num_eval, seed=d.get("seed", 0),
                                levels=tuple(d.levels),
                                heldout_percent=d.get("heldout_percent", 20))
    if kind == "geometry3k":
        return geometry3k_source(cfg.data.path, split)
    if kind == "math":
        return math_source(cfg.data.path, split)
    fields = Fields(prompt=cfg.data.prompt_field, answer=cfg.data.answer_field)
    return load_source(cfg.data.path, split, fields=fields, name="jsonl")


def make_records(cfg: ml_collections.ConfigDict, split: str, *, train: bool,
                 shard: tuple[int, int] | None = None):
    """Training: (source, checkpointable endless shuffled iterator); eval: a list of records.

    The training iterator reads only this process's block of every global batch of
    config.rollout.prompts_per_batch records (`shard` = (index, count), by default
    (jax.process_index(), jax.process_count())); with one process, the whole stream.
    """
    source = _source(cfg, split, train=train)
    if train:
        index, count = shard if shard is not None else (jax.process_index(), jax.process_count())
        dataset = make_dataset(source, seed=cfg.seed, shuffle=cfg.data.shuffle, num_epochs=None)
        dataset = shard_batches(dataset, cfg.rollout.prompts_per_batch, index, count)
        return source, make_iterator(dataset)
    records = list(make_dataset(source, shuffle=False, num_epochs=1))
    return records[: cfg.eval.num_prompts] if cfg.eval.num_prompts else records


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


def iterator_states(state) -> list:
    """Every process's data iterator state, in process order (a collective when several)."""
    return allgather_objects(state)


def own_iterator_state(meta: dict, process_index: int, process_count: int):
    """This process's data iterator state from a checkpoint's meta (`data_iterators` saved by
    multi-process runs, one per process; `data_iterator`, process 0's, otherwise)."""
    states = meta.get("data_iterators")
    if states is None:
        if process_count > 1:
            raise CheckpointError(
                f"the checkpoint holds one data iterator state, this run has {process_count} "
                "processes: resume it with one process (it was written before per-process "
                "data shards, or by a one-process run)")
        return meta["data_iterator"]
    if len(states) != process_count:
        raise CheckpointError(
            f"the checkpoint holds data iterator states of {len(states)} processes, this run "
            f"has {process_count}: resume with {len(states)} processes")
    return states[process_index]
