"""LoRA (uecjax.models.lora): fresh adapters leave the model as it was; the LoRA step's
gradient is the chain rule through the gradient on merged weights; the reference with the
adapters off is the base model; optimizer state holds the adapters alone; the sampler reads
them live; the PEFT export loads in `peft` with the same logits; the merged HF export too."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tiny_hf import write_tiny_qwen2, write_tiny_vl
from train_helpers import (SGD_LIKE, host, perturbed, random_batch, random_lora_b, single_mesh, tiny_model,
                           with_logprobs)
from uecjax.models import from_pretrained, save_pretrained
from uecjax.models.lora import LoraError, LoraSpec, adapter_names, zero_adapters
from uecjax.models.lora_init import add_lora
from uecjax.models.peft_export import save_adapter
from uecjax.objectives.methods import loss_config
from uecjax.optim import OptimConfigError
from uecjax.sampler import Sampler, SamplingParams
from uecjax.train_step import TrainStep

SPEC = LoraSpec(rank=4, alpha=8.0)
HP = loss_config("uec", beta=0.05, alpha=0.05, lam=2.0)


def test_fresh_adapters_leave_the_model_as_it_was():
    model = tiny_model(seed=2)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))
    before = model(ids)
    add_lora(model, SPEC)
    np.testing.assert_array_equal(model(ids), before)
    adapters = nnx.state(model, nnx.LoRAParam)
    assert sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)) == \
        sorted(f"['layers']['{n}'].value" for t in SPEC.targets for n in adapter_names(t))
    a = model.layers.q_lora_a[...]
    assert a.shape == (2, 32, 4) and a.dtype == jnp.float32 and float(jnp.abs(a).max()) <= 1 / np.sqrt(32)
    with pytest.raises(LoraError, match="already"):
        add_lora(model, SPEC)
    for bad, match in ((dict(rank=0), "rank"), (dict(alpha=0.0), "alpha"),
                       (dict(targets=("q", "qkv")), "targets"), (dict(dropout=1.0), "dropout")):
        with pytest.raises(LoraError, match=match):
            LoraSpec(**{**dict(rank=4, alpha=8.0), **bad})


@pytest.fixture(scope="module")
def lora_setup():
    """A LoRA model with nonzero adapters, its trainer and a scored batch."""
    model = random_lora_b(add_lora(tiny_model(seed=1), SPEC))
    trainer = TrainStep(model, HP, SGD_LIKE, single_mesh(), micro_batches=2, chunk_size=16)
    params, _, _ = trainer.init(trainer.trainable(model))
    batch = with_logprobs(trainer, params, random_batch(B=16, seed=11),
                          ref_params=perturbed(params, 0.05, 3), noise=0.05)
    h0 = 0.7 * float(np.sum(batch.response_mask * batch.old_entropy) / batch.response_mask.sum())
    return model, trainer, batch, h0


def test_lora_gradient_is_the_chain_rule_through_merged_weights(lora_setup):
    """d/dA, d/dB of the loss equal s G_W B^T and s A^T G_W, G_W autodiff of the same loss on
    a plain model carrying the merged weights W + s A B."""
    model, trainer, batch, h0 = lora_setup
    params, _, control = trainer.init(trainer.trainable(model), h0=h0)
    grads, metrics, _ = host(trainer.gradients(params, control, batch))

    merged = tiny_model(seed=1)
    arrays = host(model.layers.arrays())
    for target in SPEC.targets:
        a, b = (arrays[n] for n in adapter_names(target))
        getattr(merged.layers, f"{target}_w")[...] = arrays[f"{target}_w"] + SPEC.scale * a @ b
    full = TrainStep(merged, HP, SGD_LIKE, single_mesh(), micro_batches=2, chunk_size=16)
    full_params, _, control = full.init(nnx.state(merged), h0=h0)
    full_grads, full_metrics, _ = host(full.gradients(full_params, control, batch))

    for target in SPEC.targets:
        name_a, name_b = adapter_names(target)
        g_w = full_grads["layers"][f"{target}_w"]
        a, b = arrays[name_a], arrays[name_b]
        want_a = SPEC.scale * g_w @ np.swapaxes(b, 1, 2)
        want_b = SPEC.scale * np.swapaxes(a, 1, 2) @ g_w
        np.testing.assert_allclose(grads["layers"][name_a], want_a, rtol=2e-4, atol=1e-6, err_msg=name_a)
        np.testing.assert_allclose(grads["layers"][name_b], want_b, rtol=2e-4, atol=1e-6, err_msg=name_b)
        assert np.abs(want_a).max() > 0 and np.abs(want_b).max() > 0
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-5)


def test_step_trains_adapters_only_and_reference_is_the_base(lora_setup):
    model, trainer, batch, h0 = lora_setup
    params, opt_state, control = trainer.init(trainer.trainable(model), h0=h0)
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(params))
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted(adapter_shapes * 2)  # Adam mu, nu: adapters only
    base_before = host(trainer.base)
    new, _, _, metrics = trainer.step(params, opt_state, control, batch)
    assert np.isfinite(float(metrics["loss"]))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(host(new)),
                            jax.tree.leaves(host(trainer.trainable(model)))):
        assert not np.array_equal(x, y), jax.tree_util.keystr(path)
    jax.tree.map(np.testing.assert_array_equal, host(trainer.base), base_before)

    # The reference: the base with the adapters off, the plain model's log-probs exactly.
    ref_logp, _ = trainer.compute_logprobs(zero_adapters(new), batch)
    plain = tiny_model(seed=1)
    plain_trainer = TrainStep(plain, HP, SGD_LIKE, single_mesh(), micro_batches=2, chunk_size=16)
    want, _ = plain_trainer.compute_logprobs(nnx.state(plain), batch)
    np.testing.assert_array_equal(np.asarray(ref_logp), np.asarray(want))

    with pytest.raises(OptimConfigError, match="LoRA"):
        TrainStep(model, HP, SGD_LIKE.__class__(frozen=("visual",)), single_mesh())


def test_lora_dropout_drops_in_the_step_only(lora_setup):
    model, trainer, batch, h0 = lora_setup
    dropped = random_lora_b(add_lora(tiny_model(seed=1), LoraSpec(rank=4, alpha=8.0, dropout=0.5)))
    t2 = TrainStep(dropped, HP, SGD_LIKE, single_mesh(), micro_batches=2, chunk_size=16)
    params, _, control = trainer.init(trainer.trainable(model), h0=h0)
    # scoring never drops: the same log-probs as without dropout
    np.testing.assert_array_equal(np.asarray(t2.compute_logprobs(params, batch)[0]),
                                  np.asarray(trainer.compute_logprobs(params, batch)[0]))
    g0 = host(trainer.gradients(params, control, batch)[0])
    g1 = host(t2.gradients(params, control, batch)[0])
    g1_again = host(t2.gradients(params, control, batch)[0])
    jax.tree.map(np.testing.assert_array_equal, g1, g1_again)  # drawn from the controller's rng
    assert not np.allclose(g0["layers"]["q_lora_a"], g1["layers"]["q_lora_a"])


def test_sampler_reads_adapters_live_without_recompiling():
    model = add_lora(tiny_model(seed=3), SPEC)
    sampler = Sampler(model, pad_id=0, batching="static")
    prompts = [[5, 6, 7], [9, 10]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    first = sampler(prompts, greedy)
    compiles = sampler.compile_count
    nnx.update(model, jax.tree.map(lambda x: x * 40.0, nnx.state(random_lora_b(model), nnx.LoRAParam)))
    second = sampler(prompts, greedy)
    assert sampler.compile_count == compiles
    assert not np.array_equal(first.response_tokens, second.response_tokens)


@pytest.mark.parametrize("kind", ["text", "vl"])
def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, kind):
    """The exported adapter on the same base in transformers + peft gives uecjax's logits; the
    merged HF export gives them too."""
    from peft import PeftModel

    write = write_tiny_qwen2 if kind == "text" else write_tiny_vl
    hf = write(tmp_path / "base")
    if kind == "vl":
        hf = hf[0] if isinstance(hf, tuple) else hf
    model = random_lora_b(add_lora(from_pretrained(str(tmp_path / "base")), SPEC), std=0.2)
    save_adapter(model, str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0

    ids = np.random.default_rng(1).integers(0, 100, (2, 11))
    ours = np.asarray(model(jnp.asarray(ids)))
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    lora_layers = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert len(lora_layers) == 2 * len(SPEC.targets) and not any("visual" in n for n in lora_layers)
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    base = np.asarray(from_pretrained(str(tmp_path / "base"))(jnp.asarray(ids)))
    assert np.abs(ours - base).max() > 1e-2  # the adapters change the logits

    save_pretrained(model, str(tmp_path / "merged"))
    merged = np.asarray(from_pretrained(str(tmp_path / "merged"))(jnp.asarray(ids)))
    np.testing.assert_allclose(merged, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field, value, message", [
    ("rank", -1, "config.model.lora.rank=-1: must be an integer >= 0 (0: no LoRA)"),
    ("alpha", 0.0, "config.model.lora.alpha=0.0: must be > 0"),
    ("targets", "q,qkv", "config.model.lora.targets='q,qkv': give distinct names from"),
    ("dropout", 1.5, "config.model.lora.dropout=1.5: must be in [0, 1)"),
])
def test_config_names_the_bad_lora_field(field, value, message):
    from uecjax.config import ConfigValueError, base_config, lora_from_config, validate

    c = base_config()
    c.data.kind = "demo"
    assert lora_from_config(c) is None  # rank 0: full fine-tuning
    c.model.lora.rank = 8
    assert lora_from_config(c) == LoraSpec(rank=8, alpha=64.0)
    c.model.lora[field] = value
    with pytest.raises(ConfigValueError) as info:
        validate(c)
    assert str(info.value).startswith(message), str(info.value)
