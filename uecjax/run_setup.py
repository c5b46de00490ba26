"""What a run needs before its first step: the policy and tokenizer, the records, the prompts."""

from __future__ import annotations

import os

import jax
import ml_collections

from uecjax.data import (Fields, demo_source, geometry3k_source, load_source, make_dataset,
                         make_iterator, math_source)
from uecjax.data.records import SkipCounter
from uecjax.models import CheckpointError, from_pretrained
from uecjax.rollout import Prompt
from uecjax.sharding import ShardingError, check_model_mesh, make_mesh, model_sharding_fn
from uecjax.tokenizer import load_tokenizer, render_prompt

HF_DOWNLOAD = ("huggingface-cli download {repo} --local-dir {path}   (on a machine with "
               "internet access; copy the directory here)")


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
    """The decoder's TextConfig without loading weights: model.preset, else model.path (a
    checkpoint directory or its config.json), else the demo's tiny model; with the run's
    dtype, param_dtype and remat."""
    from uecjax.models.config import TextConfig, read_hf_config
    from uecjax.models.presets import preset

    numerics = dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    if cfg.model.preset:
        return preset(cfg.model.preset, **numerics)
    if cfg.model.path:
        if not os.path.exists(cfg.model.path):
            raise CheckpointError(f"config.model.path={cfg.model.path!r}: not found; give a "
                                  "checkpoint directory or its config.json, or config.model.preset")
        return TextConfig.from_hf(read_hf_config(cfg.model.path), source=cfg.model.path, **numerics)
    from uecjax.demo_model import DEMO_MODEL
    from uecjax.tokenizer import char_tokenizer

    demo = cfg.get("demo") or {}
    shape = {**DEMO_MODEL, **dict(demo.get("model_overrides") or {})}
    return TextConfig(vocab_size=len(char_tokenizer()), **{**shape, **numerics})


def load_policy(cfg: ml_collections.ConfigDict, workdir: str, mesh, logger):
    """(model, tokenizer): the demo's self-prepared policy, or a Hugging Face checkpoint.

    The mesh is checked against the model's shape first (`check_model_mesh`): a split that
    cannot be even is an error naming config.mesh.*, a vocabulary fallback a logged warning.
    """
    if cfg.data.kind == "demo" and not cfg.model.path:
        from uecjax.demo_model import prepare_demo_policy

        if jax.process_count() > 1:  # every process would train and write workdir/demo_init
            raise CheckpointError(
                "config.model.path='': the demo policy is prepared by a single process; run "
                "the demo once on one process (it writes WORKDIR/demo_init) and pass "
                "--config.model.path=WORKDIR/demo_init to the multi-process run")
        for warning in check_model_mesh(model_config(cfg), mesh):
            logger.text(f"warning: {warning}")

        # The warm-up must see the prompts the RL run will render.
        model, tokenizer, path = prepare_demo_policy(
            workdir, seed=cfg.demo_data.get("seed", 0), style=cfg.demo_data.style, template=cfg.prompt.template,
            use_chat_template=cfg.prompt.use_chat_template, log=logger.text, **cfg.demo.to_dict())
        logger.text(f"demo policy: {path}")
        return model, tokenizer
    path = cfg.model.path
    if not os.path.isdir(path):
        raise CheckpointError(
            f"config.model.path={path!r}: checkpoint directory not found. Download it with\n  "
            + HF_DOWNLOAD.format(repo="Qwen/Qwen2.5-1.5B-Instruct", path=path or "<dir>"))
    import json

    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    from uecjax.models.config import TextConfig

    text = TextConfig.from_hf(hf_config, source=os.path.join(path, "config.json"))
    for warning in check_model_mesh(text, mesh):
        logger.text(f"warning: {warning}")
    # The sampler and train step do not feed images yet: a VL checkpoint trains its decoder.
    model = from_pretrained(path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                            remat=cfg.model.remat, sharding_fn=model_sharding_fn(mesh, text),
                            language_model_only=True)
    return model, load_tokenizer(path)


def _source(cfg: ml_collections.ConfigDict, split: str, *, train: bool):
    kind = cfg.data.kind
    if kind == "demo":
        num = cfg.demo_data.num_train if train else cfg.demo_data.num_eval
        return demo_source("train" if train else "test", num, seed=cfg.demo_data.get("seed", 0),
                           levels=tuple(cfg.demo_data.levels), style=cfg.demo_data.style)
    if kind == "geometry3k":
        return geometry3k_source(cfg.data.path, split)
    if kind == "math":
        return math_source(cfg.data.path, split)
    fields = Fields(prompt=cfg.data.prompt_field, answer=cfg.data.answer_field)
    return load_source(cfg.data.path, split, fields=fields, name="jsonl")


def make_records(cfg: ml_collections.ConfigDict, split: str, *, train: bool):
    """Training: (source, checkpointable endless shuffled iterator); eval: a list of records."""
    source = _source(cfg, split, train=train)
    if train:
        dataset = make_dataset(source, seed=cfg.seed, shuffle=cfg.data.shuffle, num_epochs=None)
        return source, make_iterator(dataset)
    records = list(make_dataset(source, shuffle=False, num_epochs=1))
    return records[: cfg.eval.num_prompts] if cfg.eval.num_prompts else records


def prompt_stream(records, tokenizer, cfg: ml_collections.ConfigDict, max_prompt_len: int,
                  skipped: SkipCounter | None = None):
    """Rendered prompts from records; prompts longer than max_prompt_len are skipped, counted."""
    for record in records:
        ids = render_prompt(tokenizer, record.prompt, template=cfg.prompt.template,
                            use_chat_template=cfg.prompt.use_chat_template)
        if len(ids) > max_prompt_len:
            if skipped is not None:
                skipped.skip("prompts", record.id, "prompt_too_long",
                             f"{len(ids)} tokens > rollout.max_prompt_len={max_prompt_len}")
            continue
        yield Prompt(ids=ids, answer=record.answer, choices=tuple(record.choices))
