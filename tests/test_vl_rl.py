"""Qwen2.5-VL in the RL path, against transformers on a tiny random VLM: per-row padded vision
layouts, the sampler with images (greedy == generate, log-probs == recomputation, no
recompile inside a patch bucket), the sharded, micro-batched train step with images (== a
plain full-logits reference), the frozen vision tower, rows with images (concatenation,
checkpointed buffers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from tiny_hf import TINY_VL_TOKENS, tiny_qwen2_5_vl
from train_helpers import host, single_mesh

from uecjax.batch import Batch, host_batch
from uecjax.checkpoint import Checkpointer
from uecjax.control import init_control_state
from uecjax.models import from_pretrained, padded_vision_layout
from uecjax.objectives import group_advantages
from uecjax.objectives.methods import LossInputs, loss_config, loss_terms
from uecjax.optim import OptimConfig, OptimConfigError
from uecjax.rows import RowBuffer, Rows
from uecjax.sampler import Sampler, SamplingParams
from uecjax.parallel.mesh import make_mesh, param_shardings
from uecjax.train_step import TrainStep
from uecjax.vision_inputs import (PromptImages, load_image_processor, row_patches, stack_images,
                                  vision_rows)

IMG, VS, VE = (TINY_VL_TOKENS[k] for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id"))
PATCH_DIM = 3 * 2 * 14 * 14
SGD_LIKE = OptimConfig(learning_rate=0.1, eps=1.0, weight_decay=0.01, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vl") / "ckpt")
    hf = tiny_qwen2_5_vl(seed=3)
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def random_images(rng, *grids) -> PromptImages:
    grid = np.array(grids, np.int32).reshape(-1, 3)
    return PromptImages(rng.normal(size=(int(grid.prod(1).sum()), PATCH_DIM)).astype(np.float32), grid)


def prompt_ids(rng, images: PromptImages | None, before=3, after=2) -> list[int]:
    ids = [int(t) for t in rng.integers(1, 99, before)]
    for n in ([] if images is None else images.tokens_per_image(2)):
        ids += [VS] + [IMG] * n + [VE]
    return ids + [int(t) for t in rng.integers(1, 99, after)]


def torch_logits(hf, tokens, mask, images):
    present = [im for im in images if im is not None]
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                  pixel_values=torch.tensor(np.concatenate([im.pixel_values for im in present])),
                  image_grid_thw=torch.tensor(np.concatenate([im.grid_thw for im in present])),
                  mm_token_type_ids=torch.tensor((tokens == IMG).astype(np.int64))).logits.numpy()


# ---- layouts -----------------------------------------------------------------------------------

def test_padded_row_layouts_match_transformers_tower(vl):
    """Rows with one image, two images and none, each padded to 128 patches, through the
    vmapped tower: every row's real features equal transformers' for its images."""
    hf, model = vl
    rng = np.random.default_rng(0)
    rows = [random_images(rng, (1, 8, 12)), random_images(rng, (1, 4, 6), (1, 4, 4)), None]
    pixels, grids = stack_images(rows, PATCH_DIM)
    layouts = [padded_vision_layout(g[g.prod(1) > 0], model.config.vision, 128) for g in grids]
    # Shapes depend on the padded size alone, so the rows stack.
    assert len({str(jax.tree.map(np.shape, lay)) for lay in layouts}) == 1
    stacked = jax.tree.map(lambda *x: np.stack(x), *layouts)
    padded = np.pad(pixels, ((0, 0), (0, 128 - pixels.shape[1]), (0, 0)))
    features = np.asarray(nnx.jit(lambda m, p, lay: jax.vmap(m.visual)(p, lay))(model, padded, stacked))
    for b, images in enumerate(rows[:2]):
        with torch.no_grad():
            ref = torch.cat(hf.model.get_image_features(torch.tensor(images.pixel_values),
                                                        torch.tensor(images.grid_thw)).pooler_output).numpy()
        np.testing.assert_allclose(features[b, :len(ref)], ref, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="must be a multiple of 4 and hold the 96 patches"):
        padded_vision_layout(rows[0].grid_thw, model.config.vision, 64)


# ---- sampler -----------------------------------------------------------------------------------

def test_sampler_with_images_matches_transformers(vl):
    """Two prompts with images of different sizes (through the Qwen2-VL image processor):
    greedy tokens equal transformers' generate for each prompt; sampled log-probs equal a full
    recomputation; a second batch of other sizes in the same patch bucket does not recompile."""
    hf, model = vl
    rng = np.random.default_rng(1)
    processor = load_image_processor(None, model.config.vision, min_pixels=28 * 28, max_pixels=112 * 168)
    pil = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    images = [processor([pil(112, 168)]), processor([pil(50, 60)])]
    assert [im.grid_thw.tolist() for im in images] == [[[1, 8, 12]], [[1, 4, 4]]]
    prompts = [prompt_ids(rng, images[0]), prompt_ids(rng, images[1], before=5, after=4)]
    sampler = Sampler(model)
    out = sampler(prompts, SamplingParams(max_new_tokens=6, temperature=0.0), images=images)
    for row, (ids, im) in enumerate(zip(prompts, images)):
        t = torch.tensor([ids])
        with torch.no_grad():
            ref = hf.generate(input_ids=t, attention_mask=torch.ones_like(t),
                              pixel_values=torch.tensor(im.pixel_values), image_grid_thw=torch.tensor(im.grid_thw),
                              mm_token_type_ids=(t == IMG).long(), do_sample=False, max_new_tokens=6,
                              min_new_tokens=6, pad_token_id=0)
        np.testing.assert_array_equal(out.response_tokens[row], ref[0, len(ids):].numpy())

    compiles = sampler.compile_count
    other = [random_images(rng, (1, 10, 10)), random_images(rng, (1, 6, 4), (1, 2, 2))]  # 100, 28 patches
    other_prompts = [prompt_ids(rng, other[0], after=1), prompt_ids(rng, other[1], before=2)]
    out = sampler(other_prompts, SamplingParams(max_new_tokens=6, temperature=0.0), images=other)
    assert sampler.compile_count == compiles  # same prompt, response and patch (128) buckets

    out = sampler(other_prompts, SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3), images=other)
    # Continuous batching (M-RoPE offsets per slot) draws the same tokens.
    cont = Sampler(model, batching="continuous", slots=2)(
        other_prompts, SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3), images=other)
    np.testing.assert_array_equal(cont.response_tokens, out.response_tokens)
    np.testing.assert_allclose(cont.logprobs, out.logprobs, rtol=0, atol=1e-5)
    tokens = np.concatenate([out.prompt_tokens, out.response_tokens], axis=1)
    mask = np.concatenate([out.prompt_mask, out.response_mask], axis=1)
    row_images = [im for im in other for _ in range(2)]
    logits = torch_logits(hf, tokens, mask, row_images)
    P = out.prompt_tokens.shape[1]
    logp = torch.log_softmax(torch.tensor(logits[:, P - 1:-1]), -1).numpy()
    ref = np.take_along_axis(logp, out.response_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, ref * out.response_mask, atol=2e-5)

    with pytest.raises(ValueError, match="1 image entries for 2 prompts"):
        sampler(other_prompts, SamplingParams(max_new_tokens=2), images=other[:1])


def test_sampler_with_images_on_a_mesh(vl):
    """Prompts with images (two sizes, two images, none) sampled on a (2, 2, 2) mesh with the
    parameters laid out by `param_shardings`: the single-device tokens and log-probs, with the
    rows (and their patches, M-RoPE positions) split over data x fsdp."""
    _, model = vl
    rng = np.random.default_rng(4)
    images = [random_images(rng, (1, 8, 12)), random_images(rng, (1, 4, 6), (1, 2, 2)), None]
    prompts = [prompt_ids(rng, im) for im in images]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=2, seed=9)
    want = Sampler(model)(prompts, params, images=images)

    mesh = make_mesh((2, 2, 2))
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, param_shardings(mesh, state)))
    sampler = Sampler(sharded, mesh=mesh)
    prefill, seen = sampler._prefill, {}

    def spy(graphdef, state, tokens, mask, positions, vision, *args, **kwargs):
        seen["inputs"] = (tokens, positions, vision[0])
        return prefill(graphdef, state, tokens, mask, positions, vision, *args, **kwargs)

    sampler._prefill = spy
    got = sampler(prompts, params, images=images)
    for field in ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask", "truncated"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
    for x in seen["inputs"]:  # 3 prompts -> 4 rows, one per data x fsdp shard
        assert x.shape[0] == 4 and x.addressable_shards[0].data.shape == (1, *x.shape[1:])


# ---- train step -------------------------------------------------------------------------------

def vl_batch(model, rng, G=2, P=32, R=5) -> tuple[Batch, list]:
    """Prompts with one large image, two small ones, none, one tiny; G responses each."""
    per_prompt = [random_images(rng, (1, 8, 12)), random_images(rng, (1, 4, 6), (1, 2, 2)), None,
                  random_images(rng, (1, 4, 4))]
    B = len(per_prompt) * G
    tokens, mask = np.zeros((B, P + R), np.int32), np.zeros((B, P + R), np.int32)
    images = []
    for q, im in enumerate(per_prompt):
        ids = prompt_ids(rng, im)
        for j in range(G):
            i, n = q * G + j, int(rng.integers(1, R + 1))
            tokens[i, P - len(ids):P], mask[i, P - len(ids):P + n] = ids, 1
            tokens[i, P:P + n] = rng.integers(1, 99, n)
            images.append(im)
    rows = vision_rows(tokens, mask, *stack_images(images, PATCH_DIM), model.config)
    success_rate = np.repeat(np.array([0.0, 0.5, 0.0, 1.0], np.float32), G)
    batch = Batch(tokens=tokens, attention_mask=mask, positions=rows.positions,
                  response_mask=mask[:, P:].astype(np.float32),
                  advantages=np.asarray(group_advantages(rng.integers(0, 2, B).astype(np.float32), G)),
                  success_rate=success_rate, is_hard=(success_rate <= 0).astype(np.float32),
                  pixel_values=rows.pixel_values, vision=rows.layouts)
    return batch, images


def _perturbed(params, noise, seed):
    """params + noise * N(0, 1), drawn on the host (jax.random would compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + noise * rng.normal(size=x.shape).astype(np.float32), host(params))


def reference_loss(graphdef, params, batch: Batch, images, loss_cfg, h0):
    """The uec loss of the batch from the full logits of a plain forward: all images in one
    unpadded sequence (the transformers-equivalent path), no chunking, no micro-batches."""
    model = nnx.merge(graphdef, params)
    present = [im for im in images if im is not None]
    pixels = np.concatenate([im.pixel_values for im in present])
    grid = np.concatenate([im.grid_thw for im in present])
    tokens, mask = batch.tokens, batch.attention_mask
    positions, _ = model.position_ids(tokens, mask, grid)
    logits = model(jnp.asarray(tokens), jnp.asarray(mask), pixels, model.vision_layout(grid), jnp.asarray(positions))
    P = batch.prompt_len
    logp_all = jax.nn.log_softmax(logits[:, P - 1:-1], axis=-1)
    logp = jnp.take_along_axis(logp_all, jnp.asarray(tokens[:, P:])[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    m = jnp.asarray(batch.response_mask)
    x = LossInputs(logp=logp, entropy=entropy, old_logp=jnp.asarray(batch.old_logp),
                   ref_logp=jnp.asarray(batch.ref_logp), adv=jnp.asarray(batch.advantages)[:, None] * m,
                   mask=m, success_rate=jnp.asarray(batch.success_rate), hard=jnp.asarray(batch.is_hard),
                   select=None, num_tokens=m.sum(), num_seqs=jnp.sum(m.sum(1) > 0).astype(jnp.float32),
                   max_len=batch.response_len, h0=jnp.float32(h0),
                   h_anchor=jnp.sum(m * batch.old_entropy) / m.sum(), aer_alpha=jnp.float32(0.0))
    parts, _ = loss_terms(x, loss_cfg)
    return sum(parts.values()), parts


@pytest.mark.parametrize("pack", [False, True])
def test_uec_step_with_images_matches_plain_reference(vl, pack):
    """One `uec` update on a VL batch (padded per-row patches, chunked log-probs, 2
    micro-batches, sharded on a data x fsdp x tensor = 2 x 2 x 2 mesh; padded or packed rows)
    against the gradient of the same loss through full logits of an unpadded single-device
    forward; the log-probs of the scoring pass against transformers."""
    hf, model = vl
    # The reference linearises the stabilizer at the old pass's entropy: the "old" anchor.
    loss_cfg = loss_config("uec", beta=0.05, alpha=0.05, lam=2.0, stabilizer_anchor="old")
    ts = TrainStep(model, loss_cfg, SGD_LIKE, make_mesh((2, 2, 2)), micro_batches=2, chunk_size=4,
                   pack=pack)
    params, _, _ = ts.init(host(nnx.state(model)))
    batch, images = vl_batch(model, np.random.default_rng(2))

    logp, _ = ts.compute_logprobs(params, batch)
    logits = torch_logits(hf, batch.tokens, batch.attention_mask, images)
    P = batch.prompt_len
    ref = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[:, P - 1:-1], -1)),
                             batch.tokens[:, P:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp) * batch.response_mask, ref * batch.response_mask, atol=2e-5)

    old_logp, old_entropy = ts.compute_logprobs(_perturbed(params, 0.05, 1), batch)
    batch = batch.replace(old_logp=np.asarray(old_logp), old_entropy=np.asarray(old_entropy),
                          ref_logp=np.asarray(ts.compute_logprobs(_perturbed(params, 0.05, 2), batch)[0]))
    h0 = 0.7 * float(np.sum(batch.response_mask * batch.old_entropy) / batch.response_mask.sum())
    control = jax.device_put(init_control_state(loss_cfg, h0=h0), ts.replicated)
    grads, metrics, _ = ts.gradients(params, control, batch)
    (_, parts), ref_grads = jax.jit(jax.value_and_grad(
        lambda p: reference_loss(ts.graphdef, p, batch, images, loss_cfg, h0), has_aux=True))(params)
    for name in ("pg", "kl", "explore"):
        np.testing.assert_allclose(metrics[f"loss/{name}"], parts[name], rtol=1e-5, atol=1e-7)
    assert float(metrics["stabilizer_penalty"]) > 0 and float(metrics["clip_frac_low"] + metrics["clip_frac_high"]) > 0
    flat, ref_flat = host(grads), host(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(flat), jax.tree.leaves(ref_flat)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert np.abs(host(grads["visual"]["patch_w"])).max() > 1e-4  # the tower trains by default


def test_frozen_vision_tower_takes_no_update(vl):
    """optim.frozen=("visual",): after a step with weight decay the tower's parameters are
    bit-identical, it has no Adam moments, and the decoder did move."""
    _, model = vl
    loss_cfg = loss_config("grpo", beta=0.0)
    optim = OptimConfig(learning_rate=0.1, weight_decay=0.5, frozen=("visual",))
    ts = TrainStep(model, loss_cfg, optim, single_mesh(), chunk_size=8)
    params, opt_state, control = ts.init(nnx.state(model))
    batch, _ = vl_batch(model, np.random.default_rng(3))
    logp, entropy = ts.compute_logprobs(params, batch)
    batch = batch.replace(old_logp=np.asarray(logp), old_entropy=np.asarray(entropy))
    before = host(params)
    params, opt_state, control, metrics = ts.step(params, opt_state, control, batch)
    after = host(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before["visual"]), jax.tree.leaves(after["visual"])):
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["language_model"]),
                                                        jax.tree.leaves(after["language_model"])))
    moments = sum(x.size for x in jax.tree.leaves(opt_state))
    text_params = sum(x.size for x in jax.tree.leaves(before["language_model"]))
    assert moments < 2 * text_params + 100  # Adam's mu and nu for the decoder alone
    with pytest.raises(OptimConfigError, match=r"\['vision'\] name no parameter group"):
        TrainStep(model, loss_cfg, OptimConfig(frozen=("vision",)), single_mesh())


def test_rows_with_images_concat_select_and_checkpoint(vl, tmp_path):
    """Rows with images of different widths, rows without and padding rows concatenate into
    one batch; a buffer of them survives a checkpoint and gives the same batch again."""
    _, model = vl
    rng = np.random.default_rng(4)
    P, R = 40, 3

    def rows(images):
        ids = [prompt_ids(rng, im) for im in images]
        tokens, mask = np.zeros((len(ids), P), np.int32), np.zeros((len(ids), P), np.int32)
        for i, row in enumerate(ids):
            tokens[i, P - len(row):], mask[i, P - len(row):] = row, 1
        empty = Rows.empty(len(ids), P, R, with_ref=False)
        fields = {f: getattr(empty, f) for f in ("response_tokens", "response_mask", "sampler_logp", "old_logp",
                                                 "old_entropy", "ref_logp", "advantage", "success_rate", "reward",
                                                 "accuracy", "truncated", "explore")}
        fields["response_tokens"][:] = rng.integers(1, 99, (len(ids), R))
        fields["response_mask"][:] = 1
        pixels, grids = stack_images(images, PATCH_DIM) if any(im is not None for im in images) else (None, None)
        return Rows(prompt_tokens=tokens, prompt_mask=mask, pixel_values=pixels, image_grid_thw=grids, **fields)

    a = rows([random_images(rng, (1, 8, 12)), None])  # 96 patches, 1 image
    b = rows([random_images(rng, (1, 4, 6), (1, 2, 2))])  # 28 patches, 2 images
    c = rows([None])  # no images at all
    joined = Rows.concat([a, b, c, Rows.empty(1, P, R, with_ref=False)])
    assert joined.pixel_values.shape == (5, 96, PATCH_DIM) and joined.image_grid_thw.shape == (5, 2, 3)
    np.testing.assert_array_equal(joined.image_grid_thw[2], b.image_grid_thw[0])
    np.testing.assert_array_equal(joined.pixel_values[2, :28], b.pixel_values[0])
    batch = host_batch(joined, 0.0, model.config)
    assert batch.pixel_values.shape == (5, 128, PATCH_DIM) and batch.positions.shape == (5, 3, P + R)
    with pytest.raises(ValueError, match="need the model's VLConfig"):
        host_batch(joined, 0.0)
    # Processes that batch rows together agree on a patch width: at least min_patches.
    assert row_patches(joined.image_grid_thw) == 96
    wide = host_batch(joined, 0.0, model.config, min_patches=200)
    assert wide.pixel_values.shape == (5, 256, PATCH_DIM) and wide.vision.patch_order.shape == (5, 256)
    np.testing.assert_array_equal(wide.pixel_values[:, :128], batch.pixel_values)
    np.testing.assert_array_equal(wide.positions, batch.positions)

    buffer = RowBuffer()
    buffer.push(joined.select(np.array([0, 2, 3])))
    state = {"params": {"w": jnp.zeros(2)}, "opt_state": {"n": jnp.int32(0)}, "control": {"x": jnp.zeros(1)}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, **state, meta={}, buffers={"buffer": buffer.state()}, force=True)
        ckpt.wait()
        restored = ckpt.restore(1, params_target=state["params"], opt_state_target=state["opt_state"],
                                control_target=state["control"])
    again = RowBuffer()
    again.load(restored["buffers"]["buffer"])
    before, after = (jax.tree.leaves(host_batch(r, 0.0, model.config)) for r in (buffer.rows, again.rows))
    assert again.rows.pixel_values is not None and len(before) == len(after)
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)
