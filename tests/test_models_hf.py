"""Hugging Face checkpoint I/O: round trips, sharded files, the config layouts transformers 4
and 5 write, placement on a device mesh, and the errors a bad checkpoint raises.

transformers (torch, CPU) writes the reference checkpoints and reads what uecjax writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tiny_hf import TINY, write_tiny_qwen2
from transformers import Qwen2ForCausalLM

from uecjax.models import (CheckpointError, ConfigError, TextConfig, default_positions,
                           from_pretrained, save_pretrained)

# rope_theta 1e6 (as Qwen2.5 ships) and an intermediate size that 4 devices do not divide.
REF = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, intermediate_size=90)
B, T = 2, 10


@nnx.jit
def forward(model, ids, mask, positions):
    return model(ids, mask, positions)


def jax_logits(model, ids):
    ids = jnp.asarray(ids)
    mask = jnp.ones(ids.shape, jnp.int32)
    return np.asarray(forward(model, ids, mask, default_positions(mask)))


def torch_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def assert_logits_close(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=rel * max(1.0, float(np.abs(ref).max())))


def flat_params(model) -> dict[str, jax.Array]:
    return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_identical(a, b):
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        x, y = np.asarray(pa[name]), np.asarray(pb[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        # Bitwise: compare the raw bytes (also catches -0.0 / NaN payload changes).
        assert x.tobytes() == y.tobytes(), name


IDS = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(B, T), dtype=np.int32)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(transformers model, its checkpoint dir, uecjax model loaded from it, torch logits)."""
    path = tmp_path_factory.mktemp("ref")
    hf = write_tiny_qwen2(path, seed=11, **REF)
    return hf, str(path), from_pretrained(str(path)), torch_logits(hf, IDS)


@pytest.fixture(scope="module")
def saved(ref, tmp_path_factory):
    """The reference model saved by uecjax, single-file and sharded."""
    _, _, model, _ = ref
    root = tmp_path_factory.mktemp("saved")
    single, sharded = str(root / "single"), str(root / "sharded")
    save_pretrained(model, single)
    save_pretrained(model, sharded, max_shard_bytes=16_000)
    return single, sharded


def test_reference_loads(ref):
    _, _, model, expected = ref
    assert model.config.rope_theta == 1e6 and model.config.intermediate_size == 90
    assert_logits_close(jax_logits(model, IDS), expected)


def test_round_trip_float32_bit_exact(ref, saved):
    _, path, model, _ = ref
    single, _ = saved
    assert sorted(os.listdir(single)) == ["config.json", "model.safetensors"]
    reloaded = from_pretrained(single)
    assert reloaded.config == model.config
    assert_params_identical(reloaded, model)
    # The tensors written equal transformers' own file, name for name and bit for bit.
    ours, theirs = load_file(os.path.join(single, "model.safetensors")), load_file(
        os.path.join(path, "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == np.float32, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    with open(os.path.join(single, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "qwen2" and cfg["rope_theta"] == 1e6
    assert cfg["torch_dtype"] == "float32" and cfg["tie_word_embeddings"] is False


def test_round_trip_bfloat16_bit_exact(ref, tmp_path):
    _, path, _, expected = ref
    model = from_pretrained(path, dtype="bfloat16")
    out = str(tmp_path / "bf16")
    save_pretrained(model, out)
    save_pretrained(model, out)  # overwriting an existing checkpoint replaces it whole
    assert sorted(os.listdir(tmp_path)) == ["bf16"]
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    reloaded = from_pretrained(out, dtype="bfloat16")
    assert reloaded.layers.q_w[...].dtype == jnp.bfloat16
    assert_params_identical(reloaded, model)
    # The bfloat16 weights are the float32 ones rounded; a bfloat16 checkpoint loads exactly
    # into float32 parameters.
    f32 = flat_params(from_pretrained(path))
    upcast = flat_params(from_pretrained(out, dtype="float32"))
    for name, value in flat_params(reloaded).items():
        value = np.asarray(value)
        np.testing.assert_array_equal(
            value, np.asarray(f32[name]).astype(ml_dtypes.bfloat16), err_msg=name)
        assert upcast[name].dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(upcast[name]), value.astype(np.float32), err_msg=name)


def test_sharded_checkpoint_loads_identically(ref, saved):
    _, _, model, _ = ref
    _, sharded = saved
    files = sorted(os.listdir(sharded))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert len(shards) >= 3
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    total = 0
    for shard in shards:
        tensors = load_file(os.path.join(sharded, shard))
        assert {n for n, s in weight_map.items() if s == shard} == tensors.keys()
        size = sum(t.nbytes for t in tensors.values())
        assert size <= 16_000 or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total
    assert len(weight_map) == 3 + 12 * TINY["num_hidden_layers"]
    reloaded = from_pretrained(sharded)
    assert_params_identical(reloaded, model)
    np.testing.assert_array_equal(jax_logits(reloaded, IDS), jax_logits(model, IDS))


@pytest.mark.parametrize("variant", ["single", "sharded", "tied", "yarn"])
def test_saved_checkpoint_loads_in_transformers(ref, saved, tmp_path, variant):
    if variant in ("single", "sharded"):
        _, _, model, expected = ref
        out = saved[variant == "sharded"]
    else:
        overrides = {"tie_word_embeddings": True} if variant == "tied" else {"rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
            "rope_theta": 10000.0}}
        hf = write_tiny_qwen2(tmp_path / "src", seed=12, **overrides)
        expected = torch_logits(hf, IDS)
        model = from_pretrained(str(tmp_path / "src"))
        out = str(tmp_path / "out")
        save_pretrained(model, out)
    ours = jax_logits(model, IDS)
    assert_logits_close(ours, expected)
    loaded = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.tie_word_embeddings == (variant == "tied")
    if variant == "tied":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    if variant == "yarn":
        rope = loaded.config.rope_parameters
        assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0
        assert rope["original_max_position_embeddings"] == 8
    assert_logits_close(torch_logits(loaded, IDS), ours)


def _rewrite_tensors(src, dst, fn):
    """Copies a single-file checkpoint, passing its tensors through fn(dict) -> dict."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = fn(load_file(os.path.join(src, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def _edit_config(path, fn):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = fn(json.load(f))
    with open(file, "w") as f:
        json.dump(cfg, f)


def test_nested_transformers5_vl_layout(ref, tmp_path):
    """Qwen2.5-VL as transformers 5 writes it: text_config + rope_parameters, weights under
    model.language_model., vision tower tensors alongside (ignored with language_model_only)."""
    _, path, model, expected = ref
    with open(os.path.join(path, "config.json")) as f:
        text = json.load(f)
    text.pop("architectures")
    text.update(model_type="qwen2_5_vl_text",
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "tie_word_embeddings": False, "text_config": text,
              "vision_config": {"depth": 1, "hidden_size": 8, "out_hidden_size": 64}}

    def rename(tensors):
        out = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in tensors.items()}
        out["model.visual.patch_embed.proj.weight"] = np.ones((8, 3, 2, 14, 14), np.float32)
        return out

    out = _rewrite_tensors(path, str(tmp_path / "vl"), rename)
    _edit_config(out, lambda _: config)
    vl = from_pretrained(out, language_model_only=True)
    cfg = vl.config
    assert cfg.rope_theta == 1e6 and dict(cfg.rope_scaling)["mrope_section"] == (2, 3, 3)
    assert cfg.replace(rope_scaling=None) == model.config.replace(rope_scaling=None)
    assert_params_identical(vl, model)
    assert_logits_close(jax_logits(vl, IDS), expected)


def test_flat_hub_layout(ref, tmp_path):
    """The layout Qwen2.5 checkpoints ship: top-level rope_theta, rope_scaling null."""
    hf, path, model, expected = ref
    out = str(tmp_path / "flat")
    shutil.copytree(path, out)

    def flatten(cfg):
        cfg.pop("rope_parameters")
        cfg.update(rope_theta=1000000.0, rope_scaling=None, torch_dtype="bfloat16",
                   sliding_window=4096, max_window_layers=21)
        return cfg

    _edit_config(out, flatten)
    flat = from_pretrained(out)
    assert flat.config.rope_theta == 1e6 and flat.config.rope_scaling is None
    assert flat.config.param_dtype == "float32"  # torch_dtype in the file does not decide
    assert_params_identical(flat, model)
    assert_logits_close(jax_logits(flat, IDS), expected)


def test_flat_rope_scaling_spellings_parse_alike():
    """Old hub configs spell the rope kind "type"; transformers 5 writes rope_parameters."""
    base = {**TINY, "model_type": "qwen2"}
    yarn = {"factor": 4.0, "original_max_position_embeddings": 32768}
    old = TextConfig.from_hf({**base, "rope_theta": 1e6, "rope_scaling": {**yarn, "type": "yarn"}})
    new = TextConfig.from_hf({**base, "rope_parameters": {**yarn, "rope_type": "yarn", "rope_theta": 1e6}})
    assert old == new and old.rope_dict() == {**yarn, "rope_type": "yarn"}


def test_mesh_sharded_load_matches_single_device(ref, saved, tmp_path):
    _, path, model, expected = ref
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    shapes = {name: v.shape for name, v in flat_params(model).items()}
    specs = {}

    def sharding_fn(name, axes):
        shape = shapes[name]
        assert len(axes) == len(shape), name
        spec = P(*([None] * (len(shape) - 1)), "model") if shape[-1] % 4 == 0 else P()
        specs[name] = spec
        return NamedSharding(mesh, spec)

    sharded = from_pretrained(path, sharding_fn=sharding_fn)
    assert specs.keys() == shapes.keys()
    assert specs["layers/gate_w"] == P() and specs["layers/q_w"] == P(None, None, "model")
    for name, value in flat_params(sharded).items():
        assert value.sharding == NamedSharding(mesh, specs[name]), name
        assert len(value.sharding.device_set) == 8
        shard_shape = value.addressable_shards[0].data.shape
        assert shard_shape[-1] == shapes[name][-1] // (4 if specs[name] != P() else 1), name
    assert_params_identical(sharded, model)
    ours = jax_logits(sharded, IDS)
    assert_logits_close(ours, jax_logits(model, IDS), rel=1e-6)
    assert_logits_close(ours, expected)
    # Saving gathers the shards: the same file as saving the single-device model.
    save_pretrained(sharded, str(tmp_path / "out"))
    a = load_file(os.path.join(str(tmp_path / "out"), "model.safetensors"))
    b = load_file(os.path.join(saved[0], "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# -- errors ------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=re.escape(path) + ".*not found"):
        from_pretrained(path)


def test_directory_without_config(ref, tmp_path):
    shutil.copy(os.path.join(ref[1], "model.safetensors"), tmp_path)
    file = os.path.join(str(tmp_path), "config.json")
    with pytest.raises(ConfigError, match=re.escape(file) + ": not found"):
        from_pretrained(str(tmp_path))


def test_unsupported_model_type(ref, tmp_path):
    out = str(tmp_path / "llama")
    shutil.copytree(ref[1], out)
    _edit_config(out, lambda cfg: {**cfg, "model_type": "llama"})
    with pytest.raises(ConfigError, match=re.escape(os.path.join(out, "config.json")) + ".*'llama'"):
        from_pretrained(out)


def test_no_safetensors_file(ref, tmp_path):
    shutil.copy(os.path.join(ref[1], "config.json"), tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path)) + ".*model.safetensors"):
        from_pretrained(str(tmp_path))


@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight",
                                    "model.layers.0.self_attn.k_proj.bias",
                                    "model.norm.weight", "lm_head.weight",
                                    "model.embed_tokens.weight"])
def test_missing_tensor(ref, tmp_path, tensor):
    out = _rewrite_tensors(ref[1], str(tmp_path / "ckpt"),
                           lambda t: {k: v for k, v in t.items() if k != tensor})
    file = os.path.join(out, "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(file)) as e:
        from_pretrained(out)
    assert f"'{tensor}'" in str(e.value)


@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.k_proj.weight",
                                    "model.layers.0.mlp.down_proj.weight",
                                    "model.embed_tokens.weight", "lm_head.weight"])
def test_wrong_tensor_shape(ref, tmp_path, tensor):
    out = _rewrite_tensors(ref[1], str(tmp_path / "ckpt"),
                           lambda t: {**t, tensor: np.ascontiguousarray(t[tensor][:, :-2])})
    expected = load_file(os.path.join(ref[1], "model.safetensors"))[tensor].shape
    file = os.path.join(out, "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(file)) as e:
        from_pretrained(out)
    msg = str(e.value)
    assert f"'{tensor}'" in msg
    assert str((expected[0], expected[1] - 2)) in msg and str(tuple(expected)) in msg


def test_index_lists_missing_shard(saved, tmp_path):
    out = str(tmp_path / "sharded")
    shutil.copytree(saved[1], out)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    missing = weight_map["model.layers.1.self_attn.q_proj.weight"]
    os.remove(os.path.join(out, missing))
    with pytest.raises(CheckpointError, match=re.escape(os.path.join(out, missing))) as e:
        from_pretrained(out)
    assert "model.safetensors.index.json" in str(e.value)
