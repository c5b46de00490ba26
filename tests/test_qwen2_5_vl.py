"""Qwen2.5-VL against transformers: vision tower, M-RoPE positions, logits, cached decoding,
greedy generation, checkpoint layouts and round trips, and the errors bad inputs raise.

One tiny random Qwen2_5_VLForConditionalGeneration (torch CPU, float32, eager attention) is
the reference; its windows (4x4 patches) split the test images into several windows, and one
of its two vision blocks attends whole images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file
from tiny_hf import TINY_VL_TOKENS, TINY_VL_VISION, tiny_qwen2_5_vl
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from uecjax.models import (CheckpointError, ConfigError, Qwen2_5_VL, VisionConfig, from_pretrained,
                           mrope_positions, save_pretrained, vision_layout)
from uecjax.models.config import TextConfig, VLConfig
from uecjax.models.vision import window_index
from uecjax.parallel.mesh import param_shardings

IMG, VS, VE = (TINY_VL_TOKENS[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id"))
PATCH_DIM = 3 * 2 * 14 * 14
# Three images of different sizes, in patches (t, h, w): 8x12 (112x168 px, 2x3 windows),
# 4x6 (a partial window) and 4x4; 24, 6 and 4 image tokens after the 2x2 merge.
GRID = np.array([[1, 8, 12], [1, 4, 6], [1, 4, 4]])


def _text(rng, n):
    return [int(t) for t in rng.integers(1, 99, n)]


def _left_pad(rows):
    T = max(map(len, rows))
    ids, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for b, row in enumerate(rows):
        ids[b, T - len(row):], mask[b, T - len(row):] = row, 1
    return ids, mask


def _rows(rng):
    """Row 0: one large image; row 1: two images with text between and after (left-padded)."""
    return [_text(rng, 3) + [VS] + [IMG] * 24 + [VE] + _text(rng, 4),
            _text(rng, 2) + [VS] + [IMG] * 6 + [VE] + _text(rng, 3) + [VS] + [IMG] * 4 + [VE] + _text(rng, 5)]


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    """(transformers model, its checkpoint dir, our model loaded from it, inputs)."""
    path = str(tmp_path_factory.mktemp("vl") / "ckpt")
    hf = tiny_qwen2_5_vl(seed=3)
    hf.save_pretrained(path)
    rng = np.random.default_rng(0)
    ids, mask = _left_pad(_rows(rng))
    pixels = rng.normal(size=(int(GRID.prod(axis=1).sum()), PATCH_DIM)).astype(np.float32)
    return hf, path, from_pretrained(path), dict(ids=ids, mask=mask, pixels=pixels, grid=GRID)


def torch_forward(hf, ids, mask, pixels=None, grid=None):
    kwargs = {}
    if pixels is not None:
        kwargs = dict(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                      mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                  **kwargs).logits.numpy()


@nnx.jit
def jit_forward(model, ids, mask, pixels, layout, positions):
    return model(ids, mask, pixels, layout, positions)


def jax_forward(model, ids, mask, pixels, grid):
    """Logits through jit: the layout and positions are built on the host first."""
    positions, _ = model.position_ids(ids, mask, grid)
    return np.asarray(jit_forward(model, ids, mask, pixels, model.vision_layout(grid), positions))


def flat_params(model):
    return {"/".join(map(str, k)): np.asarray(v[...])
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_identical(a, b):
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype and pa[name].tobytes() == pb[name].tobytes(), name


def assert_close(ours, ref, atol=1e-4):
    assert ours.shape == ref.shape and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)


# ---- (c) vision tower ------------------------------------------------------------------------

def test_vision_layout_matches_transformers():
    """Window order, window boundaries and patch positions equal transformers' vision_utils,
    for even and partial windows and a two-frame grid."""
    grid = np.array([[1, 8, 12], [1, 6, 10], [2, 4, 6], [1, 2, 2]])
    order, cu = window_index(grid // [1, 2, 2], 56 // 2 // 14)
    ref_order, ref_cu = get_vision_window_index(torch.tensor(grid), 2, 56, 14)
    np.testing.assert_array_equal(order, ref_order.numpy())
    np.testing.assert_array_equal(np.unique(cu * 4), ref_cu.numpy())
    layout = vision_layout(grid, VisionConfig(**TINY_VL_VISION))
    positions = get_vision_position_ids(torch.tensor(grid), 2).numpy()
    np.testing.assert_array_equal(layout.rotary_pos, positions[layout.patch_order])
    # Segments cover every patch exactly once, in order.
    for seg in (layout.windows, layout.frames):
        np.testing.assert_array_equal(seg.gather.reshape(-1)[seg.scatter], np.arange(len(positions)))


def test_vision_tower_matches_transformers(vl):
    hf, _, model, x = vl
    grid, pixels = x["grid"][:2], x["pixels"][:96 + 24]  # two images: 8x12 and 4x6 patches
    layout = model.vision_layout(grid)
    assert layout.windows.gather.shape[0] == 6 + 2 and layout.frames.gather.shape[0] == 2
    assert model.config.vision.fullatt_block_indexes == (1,)
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.tensor(pixels), torch.tensor(grid)).pooler_output
    ours = nnx.jit(lambda m, p, lay: m.image_features(p, lay))(model, pixels, layout)
    assert_close(np.asarray(ours), torch.cat(ref).numpy(), atol=2e-5)
    # The chunked attention path (blocks of 16 slots: windows and frames span several) too.
    vision_config = model.visual.config
    try:
        model.visual.config = dataclasses.replace(vision_config, attention="chunked")
        with mock.patch("uecjax.models.attention.DEFAULT_BLOCK", 16):
            chunked = nnx.jit(lambda m, p, lay: m.image_features(p, lay))(model, pixels, layout)
    finally:
        model.visual.config = vision_config
    assert_close(np.asarray(chunked), torch.cat(ref).numpy(), atol=2e-5)


# ---- (b) M-RoPE positions --------------------------------------------------------------------

def test_mrope_positions_match_get_rope_index(vl):
    hf, _, model, x = vl
    rows = _rows(np.random.default_rng(5)) + [_text(np.random.default_rng(6), 7)]  # + text only
    ids, mask = _left_pad(rows)
    types = torch.tensor((ids == IMG).astype(np.int64))
    ref_pos, ref_delta = hf.model.get_rope_index(torch.tensor(ids, dtype=torch.long), types, torch.tensor(x["grid"]),
                                                 attention_mask=torch.tensor(mask))
    positions, deltas = model.position_ids(ids, mask, x["grid"])
    np.testing.assert_array_equal(positions, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_delta.numpy().reshape(-1))
    assert deltas[2] == 0 and deltas[0] < 0  # text alone: positions count real tokens


# ---- (a) logits --------------------------------------------------------------------------------

def test_logits_match_transformers(vl):
    hf, _, model, x = vl
    ref = torch_forward(hf, x["ids"], x["mask"], x["pixels"], x["grid"])
    ours = jax_forward(model, x["ids"], x["mask"], x["pixels"], x["grid"])
    real = x["mask"].astype(bool)  # padded rows' logits are not defined the same way
    assert_close(ours[real], ref[real])


def test_text_only_logits_match_transformers(vl):
    hf, _, model, _ = vl
    ids, mask = _left_pad([_text(np.random.default_rng(2), 9), _text(np.random.default_rng(3), 6)])
    real = mask.astype(bool)
    assert_close(np.asarray(model(ids, mask))[real], torch_forward(hf, ids, mask)[real])


# ---- (f) KV-cache decoding ---------------------------------------------------------------------

@nnx.jit
def _prefill(model, ids, mask, pixels, layout, positions, key_mask):
    x = model.embed(ids, pixels, layout)
    cache = model.init_cache(ids.shape[0], key_mask.shape[1])
    hidden, cache = model.hidden_states(x, positions, key_mask, cache=cache, cache_index=0)
    return model.logits(hidden), cache


@nnx.jit
def _decode(model, token, position, key_mask, cache, index):
    hidden, cache = model.hidden_states(model.embed_tokens(token), position, key_mask,
                                        cache=cache, cache_index=index)
    return model.logits(hidden)[:, 0], cache


def greedy(model, ids, mask, pixels, grid, steps):
    """Prefill + `steps` cached decode steps; returns (prefill logits, step logits, tokens).

    Decode positions: (real tokens before the new one) + rope_deltas, on all three axes.
    """
    B, P = ids.shape
    positions, deltas = model.position_ids(ids, mask, grid)
    key_mask = jnp.pad(jnp.asarray(mask), ((0, 0), (0, steps)), constant_values=1)
    logits, cache = _prefill(model, ids, mask, pixels, model.vision_layout(grid), positions, key_mask)
    next_pos = mask.sum(axis=1) + deltas
    token, step_logits, tokens = jnp.argmax(logits[:, -1], -1), [], []
    for step in range(steps):
        tokens.append(np.asarray(token))
        out, cache = _decode(model, token[:, None], jnp.asarray(next_pos + step)[:, None], key_mask,
                             cache, P + step)
        step_logits.append(np.asarray(out))
        token = jnp.argmax(out, -1)
    return np.asarray(logits), np.stack(step_logits, 1), np.stack(tokens, 1)


def test_cached_decode_matches_full_forward(vl):
    """Prefill a prompt, then feed the rest of the sequence token by token through the cache:
    the logits equal those of one full forward over the whole sequence."""
    _, _, model, x = vl
    ids, mask, steps = x["ids"], x["mask"], 4
    full = jax_forward(model, ids, mask, x["pixels"], x["grid"])
    P = ids.shape[1] - steps
    positions, deltas = model.position_ids(ids[:, :P], mask[:, :P], x["grid"])
    logits, cache = _prefill(model, ids[:, :P], mask[:, :P], x["pixels"], model.vision_layout(x["grid"]),
                             positions, jnp.asarray(mask))
    assert_close(np.asarray(logits)[mask[:, :P] == 1], full[:, :P][mask[:, :P] == 1], 1e-5)
    next_pos = mask[:, :P].sum(axis=1) + deltas
    for step in range(steps):
        out, cache = _decode(model, ids[:, P + step:P + step + 1], jnp.asarray(next_pos + step)[:, None],
                             jnp.asarray(mask), cache, P + step)
        assert_close(np.asarray(out), full[:, P + step], 1e-5)


def test_greedy_generation_matches_transformers_generate(vl):
    hf, _, model, x = vl
    steps = 4  # prompt and cache of the shapes above: the jitted steps are reused
    ids, mask = x["ids"][:, :-steps], x["mask"][:, :-steps]
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(x["pixels"]), image_grid_thw=torch.tensor(x["grid"]),
                          mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)),
                          do_sample=False, max_new_tokens=steps, pad_token_id=0)
    _, _, tokens = greedy(model, ids, mask, x["pixels"], x["grid"], steps)
    np.testing.assert_array_equal(tokens, ref[:, ids.shape[1]:].numpy())


# ---- (d) save / load -------------------------------------------------------------------------

def test_save_load_round_trip_and_transformers_reads_it(vl, tmp_path):
    hf, path, model, x = vl
    out = str(tmp_path / "saved")
    save_pretrained(model, out)
    again = from_pretrained(out)
    assert again.config == model.config
    assert_params_identical(again, model)
    # The same tensor names and config layout as transformers writes.
    assert set(load_file(os.path.join(out, "model.safetensors"))) == set(
        load_file(os.path.join(path, "model.safetensors")))
    with open(os.path.join(out, "config.json")) as f:
        assert set(json.load(f)) >= {"text_config", "vision_config", "image_token_id"}
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ref = torch_forward(reloaded, x["ids"], x["mask"], x["pixels"], x["grid"])
    real = x["mask"].astype(bool)
    assert_close(jax_forward(model, x["ids"], x["mask"], x["pixels"], x["grid"])[real], ref[real])


# ---- (e) checkpoint layouts --------------------------------------------------------------------

def _rewrite(src, dst, rename=None, config=None):
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config(cfg) if config else cfg, f)
    return dst


def _modern_names(name):
    """transformers 5's module names: model.visual.*, model.language_model.*, lm_head.weight."""
    if name.startswith("visual."):
        return "model." + name
    return re.sub(r"^model\.", "model.language_model.", name)


def _flat_hub_config(cfg):
    """The older hub layout (Qwen/Qwen2.5-VL-*): decoder fields at the top level, rope_scaling
    {"type": "mrope"}, vision_config with in_chans and model_type "qwen2_5_vl"."""
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**cfg, **{k: v for k, v in text.items() if k not in ("model_type", "layer_types")}}
    flat.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    vision = flat["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    vision.pop("rope_parameters")
    vision["model_type"] = "qwen2_5_vl"
    return flat


def test_modern_tensor_names_load(vl, tmp_path):
    _, path, model, _ = vl
    out = _rewrite(path, str(tmp_path / "modern"), rename=_modern_names)
    assert_params_identical(from_pretrained(out), model)


def test_flat_hub_config_loads(vl, tmp_path):
    hf, path, model, x = vl
    out = _rewrite(path, str(tmp_path / "flat"), config=_flat_hub_config)
    flat = from_pretrained(out)
    assert flat.config.vision == model.config.vision
    assert flat.config.mrope_section == model.config.mrope_section == (2, 3, 3)
    assert dict(flat.config.text.rope_scaling)["rope_type"] == "mrope"
    assert_params_identical(flat, model)
    # Same weights; the rope type "mrope" gives the same rotary tables as "default".
    positions = jnp.asarray(model.position_ids(x["ids"], x["mask"], x["grid"])[0])
    for a, b in zip(flat.rope(positions), model.rope(positions)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # transformers reads the flat layout as the same model too.
    ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert_close(torch_forward(ref, x["ids"], x["mask"], x["pixels"], x["grid"]),
                 torch_forward(hf, x["ids"], x["mask"], x["pixels"], x["grid"]), 0)


TEXT_WITHOUT_DEFAULTED = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("layout", ["flat", "nested_rope_scaling", "nested_rope_parameters"])
def test_missing_rope_theta_and_eps_get_transformers_qwen2_5_vl_defaults(layout):
    """Not Qwen2's 1e4 / 1e-6: transformers' Qwen2_5_VLTextConfig fills in 1e6 / 1e-5."""
    from transformers import Qwen2_5_VLConfig

    sections = {"mrope_section": [2, 3, 3]}
    if layout == "flat":  # older hub files: decoder fields at the top level
        hf = {**TEXT_WITHOUT_DEFAULTED, "rope_scaling": {"type": "mrope", **sections}}
    else:
        rope = {"rope_scaling": {"type": "mrope", **sections}} if layout == "nested_rope_scaling" \
            else {"rope_parameters": {"rope_type": "default", **sections}}  # transformers 5
        hf = {"text_config": {**TEXT_WITHOUT_DEFAULTED, **rope}}
    hf.update(model_type="qwen2_5_vl", vision_config=dict(TINY_VL_VISION), **TINY_VL_TOKENS)
    reference = Qwen2_5_VLConfig(**json.loads(json.dumps(hf))).text_config
    config = VLConfig.from_hf(json.loads(json.dumps(hf))).text
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 1e6
    assert config.rms_norm_eps == reference.rms_norm_eps == 1e-5


def test_missing_rope_theta_and_eps_get_transformers_qwen2_defaults():
    from transformers import Qwen2Config

    hf = {**TEXT_WITHOUT_DEFAULTED, "model_type": "qwen2"}
    reference = Qwen2Config(**hf)
    config = TextConfig.from_hf(hf)
    assert config.rope_theta == reference.rope_parameters["rope_theta"] == 1e4
    assert config.rms_norm_eps == reference.rms_norm_eps == 1e-6


def test_tied_embeddings_round_trip(tmp_path):
    """Qwen2.5-VL-3B ties lm_head to the embedding: no lm_head tensor is read or written."""
    hf = tiny_qwen2_5_vl(seed=4, tie_word_embeddings=True)
    hf.save_pretrained(str(tmp_path / "tied"))
    model = from_pretrained(str(tmp_path / "tied"))
    assert model.config.text.tie_word_embeddings and model.language_model.lm_head is None
    save_pretrained(model, str(tmp_path / "saved"))
    assert "lm_head.weight" not in load_file(str(tmp_path / "saved" / "model.safetensors"))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "saved"),
                                                                  attn_implementation="eager").eval()
    ids, mask = _left_pad([_text(np.random.default_rng(7), 6)])
    assert_close(np.asarray(model(ids, mask)), torch_forward(reloaded, ids, mask))
    assert_close(torch_forward(hf, ids, mask), torch_forward(reloaded, ids, mask), 0)


def test_language_model_only(vl):
    _, path, model, _ = vl
    lm = from_pretrained(path, language_model_only=True)
    assert lm.config == model.config.text
    assert_params_identical(lm, model.language_model)


def test_vl_params_have_logical_axes(vl):
    """Every VL parameter has a sharding on a (data, fsdp, tensor) mesh."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(vl[2].config, rngs=nnx.Rngs(0)))
    shardings = param_shardings(mesh, nnx.state(abstract, nnx.Param))
    assert len(jax.tree_util.tree_leaves(shardings)) == len(flat_params(vl[2]))


# ---- errors --------------------------------------------------------------------------------------

def test_bad_inputs_say_what_to_fix(vl):
    _, _, model, x = vl
    ids, mask = x["ids"].copy(), x["mask"]
    ids[0, np.argmax(ids[0] == IMG)] = 5  # one image token too few
    with pytest.raises(ValueError, match=r"needs 24 image tokens but its run has 23"):
        model(ids, mask, x["pixels"], x["grid"])
    with pytest.raises(ValueError, match=r"input_ids hold 33 image tokens .* give 34 features"):
        model.embed(ids, x["pixels"], x["grid"])
    with pytest.raises(ValueError, match=r"pixel_values has shape \(10, 1176\).*136 patches"):
        model.image_features(x["pixels"][:10], x["grid"])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        model.vision_layout([[1, 3, 4]])
    with pytest.raises(ValueError, match="image_grid_thw has 3 image"):
        mrope_positions(x["ids"][:1], x["mask"][:1], x["grid"], image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ValueError, match="under jit"):
        nnx.jit(lambda m, i, k, p: m(i, k, p, x["grid"]))(model, x["ids"], x["mask"], x["pixels"])


def test_bad_checkpoints_name_the_problem(vl, tmp_path):
    _, path, _, _ = vl
    out = _rewrite(path, str(tmp_path / "no_block"), rename=lambda k: k.replace("visual.blocks.1.attn.qkv.weight", "x"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'visual.blocks.1.attn.qkv.weight'"):
        from_pretrained(out)

    def small_out(cfg):
        cfg["vision_config"]["out_hidden_size"] = 32
        return cfg

    out = _rewrite(path, str(tmp_path / "bad_cfg"), config=small_out)
    with pytest.raises(ConfigError, match="out_hidden_size=32 differs from the decoder's hidden_size=64"):
        from_pretrained(out)
    no_vision = _rewrite(path, str(tmp_path / "text_only"),
                         rename=lambda k: k.replace("visual.", "unused."))
    with pytest.raises(CheckpointError, match="language_model_only=True"):
        from_pretrained(no_vision)
    shutil.rmtree(no_vision)
