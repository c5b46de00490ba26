"""Memory options at real size: optimizer-state dtype, reference offload, the forward-only
log-prob pass, and the abstract `--dry_run` (tiny preset on 1 and 8 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uecjax.optim import OptimConfig, OptimConfigError, make_optimizer


@pytest.mark.parametrize("state_dtype, want", [("", {"bfloat16", "float32"}), ("float32", {"float32"}),
                                               ("bfloat16", {"bfloat16"})])
def test_optimizer_moments_keep_their_dtype(state_dtype, want):
    """Adam's moments are created in state_dtype ("" = each parameter's dtype) and stay in it
    after float32 gradients (plain optax would turn bfloat16 moments into float32 ones)."""
    params = {"w": jnp.ones((4, 4), jnp.bfloat16), "input_norm": jnp.ones((4,), jnp.float32)}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, state_dtype=state_dtype))
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    updates, new_state = tx.update(grads, state, params)
    moments = lambda s: {str(x.dtype) for x in jax.tree.leaves(s) if x.ndim}  # noqa: E731
    assert moments(state) == moments(new_state) == want
    assert jax.tree.map(lambda x: x.dtype, jax.tree.leaves(new_state)) == \
        jax.tree.map(lambda x: x.dtype, jax.tree.leaves(state))
    assert np.all(np.asarray(updates["w"], np.float32) < 0)  # the update itself still happens
    with pytest.raises(OptimConfigError, match="state_dtype='float16'"):
        OptimConfig(state_dtype="float16")


# ---- the reference model in host memory ----

def test_reference_offload_round_trip():
    """On CPU offload does nothing unless forced; forced, the parameters sit in pinned host
    memory and come back to the device equal, giving the same log-probs."""
    from flax import nnx

    from train_helpers import SGD_LIKE, random_batch, single_mesh, tiny_model
    from uecjax.objectives.methods import loss_config
    from uecjax.offload import HostParams
    from uecjax.train_step import TrainStep

    trainer = TrainStep(tiny_model(), loss_config("grpo"), SGD_LIKE, single_mesh())
    params, _, _ = trainer.init(nnx.state(tiny_model()))
    assert not HostParams(params, trainer.param_shardings, offload=True).offloaded  # CPU: no-op
    ref = HostParams(params, trainer.param_shardings, offload=True, allow_cpu=True)
    assert ref.offloaded
    assert {x.sharding.memory_kind for x in jax.tree.leaves(ref.params)} == {"pinned_host"}
    back = ref.on_device()
    assert {x.sharding.memory_kind for x in jax.tree.leaves(back)} == {"device"}
    batch = random_batch()
    want, got = trainer.compute_logprobs(params, batch), trainer.compute_logprobs(back, batch)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


# ---- dry run ----

def tiny_run(method="grpo", **mesh):
    from uecjax.config import base_config

    c = base_config()
    c.method = method
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.rollout.max_prompt_len, c.rollout.max_new_tokens = 32, 32  # 8 x 5 rows of 64 tokens
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return c


def layer_split_counts(text):
    """(parameters split along the hidden axis by fsdp, parameters kept whole: norms, biases)."""
    from uecjax.models.presets import parameter_count

    q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
    whole = text.num_hidden_layers * (q + 2 * kv + 2 * text.hidden_size) + text.hidden_size
    return parameter_count(text) - whole, whole


def check_report(report, lines, devices):
    """The printed lines and the JSON line of a tiny-preset dry run on `devices` devices
    (mesh fsdp = devices): parameter bytes are the analytic count split by fsdp."""
    import json

    from uecjax.models.presets import parameter_count, preset

    text = preset("tiny")
    split, whole = layer_split_counts(text)
    assert json.loads(lines[-1]) == json.loads(json.dumps(report))  # one JSON line, last
    for label in ("parameters", "optimizer state", "reference parameters", "batch",
                  "activations / temporaries", "generated code", "total"):
        assert any(line.strip().startswith(label) for line in lines), label
    b = report["per_device_bytes"]
    assert report["devices"] == devices and report["mesh"]["fsdp"] == devices
    assert report["parameters"] == parameter_count(text)
    # float32 parameters: the hidden-axis matrices split over fsdp, norms and biases whole.
    assert b["params"] == 4 * (split // devices + whole)
    assert b["optimizer_state"] - 2 * b["params"] in range(0, 64)  # Adam's mu, nu + counters
    assert b["reference_params"] == b["params"]  # beta > 0, not offloaded
    assert b["temp"] > 0 and b["total"] == sum(v for k, v in b.items() if k != "total")
    args = b["params"] + b["optimizer_state"] + b["batch"]
    # A packed step never reads the padded attention mask (int32 [rows, T], split over devices).
    batch = report["batch"]
    unread = 4 * batch["rows"] * (batch["prompt_len"] + batch["response_len"]) // devices
    # The compiler's arguments: ours plus the controller state, less unused batch fields.
    low = 0.99 * (args - (unread if report["packing"] else 0))
    assert low < report["compiler"]["argument_bytes"] < args + 64


def test_dry_run_tiny_preset_on_1_and_8_devices():
    """In process on one device; `python -m uecjax.train --dry_run --dry_run_devices=8` on 8
    simulated CPU devices with an fsdp mesh; a mesh that does not divide the model is one
    error line."""
    import io
    import json
    import os
    import subprocess
    import sys

    from uecjax.dry_run import dry_run
    from uecjax.models.presets import parameter_count, preset

    out = io.StringIO()
    report = dry_run(tiny_run(), devices=jax.devices()[:1], out=out)
    check_report(report, out.getvalue().splitlines(), 1)
    assert report["per_device_bytes"]["params"] == 4 * parameter_count(preset("tiny"))

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # The suite's XLA_FLAGS give 8 devices; --dry_run_devices must win, so ask for 4 here.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    cli = [sys.executable, "-m", "uecjax.train", "--config=configs/math.py", "--dry_run",
           "--config.model.preset=tiny", "--config.model.dtype=float32", "--config.method=grpo",
           "--config.rollout.max_prompt_len=32", "--config.rollout.max_new_tokens=32",
           "--dry_run_devices=8", "--config.mesh.data=1"]
    result = subprocess.run(cli + ["--config.mesh.fsdp=-1"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    check_report(json.loads(lines[-1]), lines, 8)
    bad = subprocess.run(cli + ["--config.mesh.tensor=-1"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert ("error: config.mesh.tensor=8 does not divide the model's num_attention_heads=4; "
            "choose a tensor size that divides it (1, 2, 4)") in bad.stderr
    assert "Traceback" not in bad.stderr


def test_dry_run_reports_the_packed_layout():
    """train.pack: the dry run compiles the packed step for sequences filling dry_run_fill of
    the padded slots; at a quarter fill its temporaries are below the padded step's."""
    import io

    from uecjax.dry_run import dry_run
    from uecjax.packing import packed_rows_bucket

    padded = dry_run(tiny_run(), devices=jax.devices()[:1], out=None)
    c = tiny_run()
    c.train.update(pack=True, dry_run_fill=0.25)
    out = io.StringIO()
    packed = dry_run(c, devices=jax.devices()[:1], out=out)
    rows = padded["batch"]["rows"]
    assert packed["packing"] == {"fill": 0.25, "tokens_per_row": 63, "rows_per_block": rows,
                                 "packed_rows_per_block": packed_rows_bucket(-(-rows // 4), rows),
                                 "head_on_slots": True}
    assert padded["packing"] is None and "packed: " in out.getvalue()
    assert packed["per_device_bytes"]["temp"] < padded["per_device_bytes"]["temp"]


def test_logprob_pass_keeps_no_activations(tmp_path):
    """The old / reference log-prob pass is forward only: its temporaries neither grow with
    depth nor depend on remat, while the train step's grow with depth and shrink with remat
    (none > per_layer > full)."""
    import json

    from uecjax.dry_run import dry_run
    from uecjax.models.presets import preset

    temps = {}
    for layers, remat in ((2, "none"), (8, "none"), (8, "per_layer"), (8, "full")):
        path = tmp_path / f"L{layers}.json"
        path.write_text(json.dumps(preset("tiny").replace(num_hidden_layers=layers).to_hf()))
        c = tiny_run()
        c.model.preset, c.model.path, c.model.remat = "", str(path), remat
        r = dry_run(c, devices=jax.devices()[:1], out=None)
        temps[layers, remat] = (r["per_device_bytes"]["temp"], r["logprob_pass_temp_bytes"])
    assert len({logprob for _, logprob in temps.values()}) == 1
    step = {key: t for key, (t, _) in temps.items()}
    assert step[8, "none"] > step[2, "none"] > temps[2, "none"][1]
    assert step[8, "none"] > step[8, "per_layer"] > step[8, "full"] > temps[8, "full"][1]


# ---- dry run of Qwen2.5-VL ----

def test_vl_presets_have_the_hub_parameter_counts():
    """qwen2.5-vl-3b / -7b are whole VLConfigs whose abstractly built Qwen2_5_VL (no weights
    allocated) has the parameter counts of the hub checkpoints, vision tower included; text
    presets stay TextConfigs."""
    import math

    from flax import nnx

    from uecjax.models import Qwen2_5_VL, TextConfig, VLConfig
    from uecjax.models.presets import parameter_count, preset, vision_parameter_count

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    # Qwen/Qwen2.5-VL-{3B,7B}-Instruct: total and vision-tower ("visual.*") parameters.
    for name, total, vision, hidden in (("qwen2.5-vl-3b", 3_754_622_976, 668_684_288, 2048),
                                        ("qwen2.5-vl-7b", 8_292_166_656, 676_550_144, 3584)):
        config = preset(name, dtype="bfloat16")
        assert isinstance(config, VLConfig) and config.vision.dtype == "bfloat16"
        v = config.vision
        assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size) == \
            (32, 1280, 3420, 16, hidden)
        assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size,
                v.fullatt_block_indexes, v.tokens_per_second) == (14, 2, 2, 112, (7, 15, 23, 31), 2)
        assert config.mrope_section == (16, 24, 24)
        assert (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                config.vision_end_token_id) == (151655, 151656, 151652, 151653)
        model = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
        assert count(nnx.state(model, nnx.Param)) == parameter_count(config) == total
        assert count(nnx.state(model.visual, nnx.Param)) == vision_parameter_count(v) == vision
        assert preset(name, language_model_only=True) == preset(name).text
    assert isinstance(preset("qwen2.5-7b"), TextConfig) and isinstance(preset("tiny"), TextConfig)


def test_model_config_reads_a_vl_config_json(tmp_path):
    """model.path to a qwen2_5_vl config.json gives its VLConfig (as the loader reads it), with
    the run's numerics on the decoder and the tower; an image whose tokens exceed the prompt
    length is a config error naming the knob."""
    import json

    from uecjax.config import ConfigValueError
    from uecjax.dry_run import dry_run_image
    from uecjax.models.presets import preset
    from uecjax.setup import model_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset("tiny-vl").to_hf()))
    c = tiny_vl_run()
    c.model.preset, c.model.path, c.model.remat = "", str(path), "per_layer"
    assert model_config(c) == preset("tiny-vl", dtype="float32", remat="per_layer")
    image = dry_run_image(model_config(c), c, 32)
    assert image == dict(pixels=3136, image_hw=[56, 56], grid_thw=[1, 4, 4], patches=16,
                         patch_bucket=64, image_tokens=4)
    c.vision.dry_run_pixels = 0  # min_pixels: 28 x 28, one merged token
    assert dry_run_image(model_config(c), c, 32)["image_tokens"] == 1
    c.vision.dry_run_pixels = 112 * 112  # 64 patches, 16 tokens + 2 > 16
    with pytest.raises(ConfigValueError, match=r"vision.dry_run_pixels=12544: an image of 112x112 "
                                               r"pixels takes 16 image tokens"):
        dry_run_image(model_config(c), c, 16)


def test_resized_size_is_the_processors():
    """The dry run's image grid follows transformers' smart_resize (what the processor does)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    from uecjax.models.presets import preset
    from uecjax.vision_inputs import resized_size

    vision = preset("qwen2.5-vl-3b").vision
    for h, w in ((10, 900), (300, 200), (512, 512), (777, 1024), (2048, 2048), (5000, 4000)):
        for lo, hi in ((262144, 4194304), (784, 12544)):
            assert resized_size(h, w, vision, min_pixels=lo, max_pixels=hi) == \
                smart_resize(h, w, 28, min_pixels=lo, max_pixels=hi), (h, w, lo, hi)


def tiny_vl_run(**kwargs):
    """tiny_run with the tiny Qwen2.5-VL: one 56 x 56 image per row (4 x 4 patches, bucket 64)."""
    c = tiny_run(**kwargs)
    c.model.preset = "tiny-vl"
    c.vision.min_pixels, c.vision.max_pixels, c.vision.dry_run_pixels = 28 * 28, 112 * 112, 56 * 56
    return c


def test_dry_run_tiny_vl_with_trained_and_frozen_tower():
    """A tiny Qwen2.5-VL dry run compiles the step with images in the batch; its vision_params
    are the tower of a concretely built model, the parameter bytes hold the tower, and with
    freeze_vision the optimizer state drops by exactly the tower's moments. With bfloat16
    compute the reference parameters count in bfloat16, as the loop stores them."""
    import io
    import math

    from flax import nnx

    from uecjax.dry_run import dry_run
    from uecjax.models import Qwen2_5_VL
    from uecjax.models.presets import parameter_count, preset

    config = preset("tiny-vl", dtype="float32")
    concrete = Qwen2_5_VL(config, rngs=nnx.Rngs(0))
    tower = sum(x.size for x in jax.tree.leaves(nnx.state(concrete.visual, nnx.Param)))

    out = io.StringIO()
    trained = dry_run(tiny_vl_run(), devices=jax.devices()[:1], out=out)
    lines = out.getvalue().splitlines()
    assert any(line.strip().startswith("vision tower: 0.1M parameters (trained)") for line in lines)
    assert any("56x56 = 16 patches, padded to 64; 4 image tokens" in line for line in lines)
    b, v = trained["per_device_bytes"], trained["vision"]
    assert trained["vision_params"] == v["params"] == tower > 0
    assert trained["parameters"] == parameter_count(config)
    assert b["params"] == 4 * parameter_count(config) and v["param_bytes"] == 4 * tower
    assert v["optimizer_state_bytes"] == 2 * v["param_bytes"]  # Adam's mu and nu
    rows = trained["batch"]["rows"]
    assert b["batch"] > rows * 64 * config.vision.patch_dim * 4  # the pixel values are in it

    frozen_cfg = tiny_vl_run()
    frozen_cfg.model.freeze_vision = True
    frozen_cfg.model.dtype = "bfloat16"  # float32 parameters, bfloat16 compute
    frozen = dry_run(frozen_cfg, devices=jax.devices()[:1], out=None)
    fb = frozen["per_device_bytes"]
    assert frozen["vision"]["frozen"] and frozen["vision"]["optimizer_state_bytes"] == 0
    assert fb["params"] == b["params"] and fb["batch"] == b["batch"]
    # The reference is kept in the compute dtype (uecjax.train): half the float32 parameters.
    assert fb["reference_params"] == b["params"] // 2 and b["reference_params"] == b["params"]
    assert frozen["vision"]["reference_bytes"] == v["param_bytes"] // 2
    assert b["optimizer_state"] - fb["optimizer_state"] == v["optimizer_state_bytes"]
    assert math.isclose(fb["optimizer_state"], 2 * 4 * (parameter_count(config) - tower), abs_tol=64)
