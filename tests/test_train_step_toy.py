"""Each method on a toy RL problem, sampled with the real sampler (ALGORITHMS.md sections 6, 7, 9).

Policy: a tiny Qwen2 over 16 tokens whose lm-head is scaled up, so the initial entropy H_0
(about 1.5 nats) is well below log 16 and can move both ways. Prompts are one token. On the
2 easy prompts the reward is the fraction of the 4 response tokens equal to the prompt's
target token; the 6 hard prompts never pay (every response fails, as for a prompt beyond the
model). So GRPO sees signal on the easy prompts only, and the hard prompts stay hard.

What each method should do there:
  * grpo: learns the easy prompts, and its entropy collapses;
  * uec: learns them too, while the gated exploration keeps the hard prompts' entropy up and
    the stabilizer holds the batch entropy at H_max (without it, it overshoots);
  * entropy_reg with a large coefficient: entropy blows up towards log V and it does not learn;
  * aer: its coefficient switches on whenever the entropy falls below its target, which
    keeps the entropy from collapsing;
  * dapo, clip_cov, kl_cov, entropy_adv: learn the easy prompts.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from uecjax.models import Qwen2, TextConfig
from uecjax.groups import group_stats, shaped_rewards
from uecjax.objectives.methods import loss_config
from uecjax.rows import Rows
from uecjax.optim import OptimConfig
from uecjax.sampler import Sampler, SamplingParams
from uecjax.parallel.mesh import make_mesh
from uecjax.train_step import TrainStep

V, R, G = 16, 4, 8
EASY = {1: 9, 2: 10}  # prompt token -> target token
PROMPTS = [[1], [2], [3], [4], [5], [6], [7], [8]]
MAX_REWARD = len(EASY) / len(PROMPTS)
OPTIM = OptimConfig(learning_rate=3e-3, weight_decay=0.0, max_grad_norm=1.0)


@pytest.fixture(scope="module")
def toy():
    cfg = TextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 20.0
    initial = jax.tree.map(lambda x: x.copy(), nnx.state(model))
    return model, initial, Sampler(model, prompt_buckets=(1,), response_buckets=(R,))


@pytest.fixture(scope="module")
def toy_lora(toy):
    """The toy policy with rank-4 adapters on every projection (B = 0: the same first policy)."""
    from uecjax.models.lora import LoraSpec
    from uecjax.models.lora_init import add_lora

    model, initial, _ = toy
    nnx.update(model, initial)
    lora = add_lora(nnx.clone(model), LoraSpec(rank=4, alpha=8.0))
    return lora, jax.tree.map(lambda x: x.copy(), nnx.state(lora)), Sampler(
        lora, prompt_buckets=(1,), response_buckets=(R,))


def rewards(out):
    prompt = out.prompt_tokens[:, -1]
    target = np.array([EASY.get(int(p), -1) for p in prompt])
    r = (out.response_tokens == target[:, None]).mean(axis=1).astype(np.float32)
    return r, (r >= 0.5).astype(np.float32)


def sampled_rows(out, rewards, acc, loss_cfg) -> Rows:
    """The rollout's path from sampler output to scored-ready rows (no selection)."""
    rows = Rows.from_sampler(out, out.prompt_tokens.shape[1])
    rows.reward, rows.accuracy = np.asarray(rewards, np.float32), np.asarray(acc, np.float32)
    shaped = shaped_rewards(rows.reward, rows.response_mask.sum(1), R, loss_cfg)
    stats = group_stats(shaped, rows.accuracy, G, loss_cfg.advantage)
    rows.advantage, rows.success_rate = stats.advantage, stats.success_rate
    return rows


def run(toy, method, steps, optim=OPTIM, **overrides):
    """Trains from the same initial policy; returns per-step metrics as arrays, plus reward.
    With LoRA adapters on the toy's model, the step trains those alone."""
    model, initial, sampler = toy
    nnx.update(model, initial)
    loss_cfg = loss_config(method, beta=0.0, **overrides)
    ts = TrainStep(model, loss_cfg, optim, make_mesh((1, 1, 1), devices=jax.devices()[:1]))
    params, opt_state, control = ts.init(ts.trainable(model))
    history = []
    for step in range(steps):
        nnx.update(model, params)  # the sampler reads the model's (current) parameters
        out = sampler(PROMPTS, SamplingParams(max_new_tokens=R, n=G, seed=step))
        r, acc = rewards(out)
        rows = sampled_rows(out, r, acc, loss_cfg)
        rows.old_logp, rows.old_entropy, _ = ts.score(params, rows)
        params, opt_state, control, metrics = ts.step(params, opt_state, control,
                                                      ts.device_batch(rows))
        control = ts.update_control(control, metrics)
        history.append({**jax.device_get(metrics), "reward": r.mean()})
    return {k: np.array([h[k] for h in history]) for k in history[0]}


def test_grpo_entropy_collapses(toy):
    h = run(toy, "grpo", 100)
    h0 = h["h0"][0]
    assert 1.0 < h0 < 0.75 * np.log(V)
    assert h["reward"][-10:].mean() > 0.95 * MAX_REWARD
    assert h["entropy"][-10:].mean() < 0.05 * h0
    assert h["logp_gap"].max() < 1e-4  # sampler and trainer agree on the log-probs


def test_uec_keeps_entropy_between_a_floor_and_h_max(toy):
    h = run(toy, "uec", 120, alpha=0.05)
    h0, h_max = h["h0"][0], h["h_max"][0]
    late = h["entropy"][-50:]
    assert late.min() > 0.6 * h0  # no collapse
    assert late.max() < h_max + 0.1  # held at the bound
    assert h["entropy_hard"][-50:].min() > h_max  # exploration goes to the hard prompts
    assert h["reward"][-10:].mean() > 0.95 * MAX_REWARD
    assert h["stabilizer_penalty"][-50:].max() > 0  # the stabilizer is what holds it
    free = run(toy, "uec", 60, alpha=0.05, stabilizer=False)
    assert free["entropy"][-20:].min() > h_max + 0.3


def test_entropy_reg_with_a_large_coefficient_blows_up(toy):
    h = run(toy, "entropy_reg", 60, entropy_coef=0.5)
    assert h["entropy"][-20:].min() > max(0.9 * np.log(V), 1.5 * h["h0"][0])  # near the maximum
    assert h["reward"][-20:].mean() < 0.5 * MAX_REWARD


def test_aer_coefficient_tracks_its_target_and_prevents_collapse(toy):
    h = run(toy, "aer", 100, aer_rho=0.8, aer_eta=0.05)
    target, alpha, entropy = h["aer_target"][0], h["aer_alpha"], h["entropy"]
    assert alpha.max() > 0.05  # switched on once the entropy fell below H*
    moved = np.diff(alpha) != 0  # alpha_{k+1} - alpha_k has the sign of H* - H_k
    assert moved.sum() > 5
    np.testing.assert_array_equal(np.sign(np.diff(alpha)[moved]), np.sign(target - entropy[:-1][moved]))
    assert entropy[20:].min() > 0.7 * target  # no collapse (GRPO goes to ~0 here)
    assert h["reward"][-10:].mean() > 0.95 * MAX_REWARD


@pytest.mark.parametrize("method", ["dapo", "clip_cov", "kl_cov", "entropy_adv"])
def test_other_methods_learn(toy, method):
    h = run(toy, method, 60)
    assert h["reward"][-10:].mean() > 0.95 * MAX_REWARD
    assert np.isfinite(h["loss"]).all() and (h["entropy"] < np.log(V)).all()


@pytest.mark.parametrize("method", ["grpo", "uec"])
def test_lora_learns_as_full_fine_tuning_does(toy, toy_lora, method):
    """Adapters alone (4096 parameters on a 23,840-parameter base), at 3x the full run's
    learning rate: the easy prompts are learnt as in full fine-tuning (the sampler reads the
    adapters each step), and GRPO's entropy collapses as it does there."""
    optim = OptimConfig(learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0)
    h = run(toy_lora, method, 100, optim=optim, **({"alpha": 0.05} if method == "uec" else {}))
    assert h["reward"][-10:].mean() > 0.95 * MAX_REWARD
    assert h["logp_gap"].max() < 1e-4  # sampler (unmerged adapters) and trainer agree
    if method == "grpo":
        assert h["entropy"][-10:].mean() < 0.05 * h["h0"][0]
    else:
        assert h["entropy"][-30:].min() > 0.6 * h["h0"][0]
