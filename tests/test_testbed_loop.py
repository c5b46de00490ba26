"""The compiled testbed against the library's host pieces: its sampling is the sampler's, one of
its updates is one TrainStep update, a vmapped seed is that seed alone, Pass@k is exact."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train_helpers import TINY, host, single_mesh, tiny_model
from uecjax.control import init_control_state, update_control, update_control_traced
from uecjax.objectives import LossConfigError, loss_config
from uecjax.optim import OptimConfig
from uecjax.sampler import Sampler, SamplingParams
from uecjax.metrics import pass_at_k, pass_at_k_counts
from uecjax.testbed.loop import CompiledLoop, TaskArrays, loop_config
from uecjax.train_step import TrainStep

STOP = 2
OPTIM = OptimConfig(learning_rate=3e-3, weight_decay=0.0, max_grad_norm=1.0)


def first_token_reward(tokens, mask, answer):
    """Toy verifiable reward: the first response token is the prompt's answer token."""
    return ((tokens[0] == answer) & (mask[0] > 0)).astype(jnp.float32)


def toy_task(n: int, seed: int, width: int = 6) -> TaskArrays:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, width + 1, n)
    prompts = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    for i, L in enumerate(lengths):
        prompts[i, width - L:] = rng.integers(3, TINY.vocab_size, L)
        mask[i, width - L:] = 1
    # Answers among a few tokens, so that some prompts are solved and some are not.
    answer = rng.integers(3, 9, n).astype(np.int32)
    return TaskArrays(jnp.asarray(prompts), jnp.asarray(mask), (jnp.asarray(answer),),
                      jnp.asarray(rng.integers(1, 3, n).astype(np.int32)))


def make_testbed(method="uec", steps=2, eval_every=1, **overrides):
    loss_cfg = loss_config(method, beta=0.01, tau_hard=0.0)
    cfg = loop_config(method, prompts_per_step=4, group_size=4, max_new_tokens=5, steps=steps,
                         eval_every=eval_every, eval_samples=8, eval_chunk=4,
                         stop_token_ids=(STOP,), explore_prompts=2, explore_samples=4,
                         **overrides)
    return CompiledLoop(tiny_model(0, scale=2.0), toy_task(16, 1), toy_task(8, 2), first_token_reward,
                   cfg, loss_cfg, OPTIM)


def test_generate_traced_samples_what_the_sampler_samples():
    model = tiny_model(0, scale=2.0)
    sampler = Sampler(model, pad_id=0)
    task = toy_task(4, 3, width=16)  # 4 prompts of the sampler's 16-wide bucket: same layout
    prompts = [list(np.asarray(p)[np.asarray(m) > 0]) for p, m in zip(task.prompts, task.prompt_mask)]
    out = sampler(prompts, SamplingParams(max_new_tokens=6, n=3, seed=5, stop_token_ids=(STOP,)))
    tokens, valid, logp, finished = jax.jit(
        lambda s, t, m: sampler.generate_traced(s, t, m, jax.random.key(5), n=3, max_new_tokens=6,
                                                stop_token_ids=(STOP,)))(
        nnx.state(model), task.prompts, task.prompt_mask)
    np.testing.assert_array_equal(np.asarray(tokens), out.response_tokens)
    np.testing.assert_array_equal(np.asarray(valid).astype(np.int32), out.response_mask)
    np.testing.assert_allclose(np.asarray(logp), out.logprobs, atol=1e-5)
    np.testing.assert_array_equal(~np.asarray(finished), out.truncated)


@pytest.mark.parametrize("method", ["uec", "dapo"])
def test_one_testbed_update_is_one_train_step_update(method):
    """The testbed's batch (sampled, graded, selected, scored inside its jit) through its update
    equals TrainStep's update of the same batch, with the old log-probs TrainStep computes."""
    bed = make_testbed(method)
    loss_cfg = bed.loss_cfg
    batch, _ = jax.jit(lambda p, k: bed.rollout(p, k, loss_cfg))(bed.params0, jax.random.key(3))
    assert float(jnp.sum(batch.response_mask)) > 0
    control = init_control_state(loss_cfg, 0, h0=1.5)
    opt_state = bed.optimizer.init(bed.params0)
    params_bed, _, _, m_bed = jax.jit(lambda *a: bed.update(*a, loss_cfg))(bed.params0, opt_state, control, batch)

    model = nnx.merge(bed.graphdef, bed.params0)
    trainer = TrainStep(model, loss_cfg, OPTIM, single_mesh())
    params, opt_state, _ = trainer.init(nnx.state(model), seed=0, h0=1.5)
    host_batch = jax.tree.map(np.asarray, batch)
    old_logp, old_entropy = trainer.compute_logprobs(params, host_batch)
    np.testing.assert_allclose(np.asarray(old_logp), host_batch.old_logp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(old_entropy), host_batch.old_entropy, atol=1e-5)
    ref_logp, _ = trainer.compute_logprobs(params, host_batch)
    host_batch = host_batch.replace(old_logp=np.asarray(old_logp), old_entropy=np.asarray(old_entropy),
                                    ref_logp=np.asarray(ref_logp))
    params_ts, _, _, m_ts = trainer.step(params, opt_state, control, host_batch)
    for a, b in zip(jax.tree.leaves(host(params_bed)), jax.tree.leaves(host(params_ts))):
        np.testing.assert_allclose(a, b, atol=2e-6)
    for k in ("loss", "entropy", "grad_norm"):
        np.testing.assert_allclose(float(m_bed[k]), float(m_ts[k]), rtol=1e-4, atol=1e-6)


def test_a_vmapped_seed_equals_that_seed_alone_and_a_swept_value_its_static_twin():
    # entropy_reg: a traced coefficient, and no exploration rollouts (a smaller program to
    # compile three times; the exploration path is in the TrainStep test above)
    bed = make_testbed("entropy_reg", steps=2, eval_every=1)
    both = bed.run(seeds=[4, 7])
    alone = bed.run(seeds=[7])
    # atol 1e-4: entropy_easy is a difference of float32 sums (about 0 when every prompt is
    # hard), so a different reduction order moves it by a few 1e-5.
    for k, v in both["metrics"].items():
        np.testing.assert_allclose(np.asarray(v[1]), np.asarray(alone["metrics"][k][0]),
                                   rtol=1e-4, atol=1e-4, err_msg=k)
    np.testing.assert_array_equal(np.asarray(both["eval_correct"][1]), np.asarray(alone["eval_correct"][0]))
    for a, b in zip(jax.tree.leaves(both["params"]), jax.tree.leaves(alone["params"])):
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b)[0], atol=1e-5)
    # different seeds are different runs
    assert not np.allclose(np.asarray(both["metrics"]["train/loss"][0]),
                           np.asarray(both["metrics"]["train/loss"][1]))
    assert both["eval_correct"].shape == (2, 3, 8)
    # A traced coefficient equal to the config's is the same run; 0 removes the bonus.
    swept = bed.run(seeds=[7, 7], sweep={"entropy_coef": [bed.loss_cfg.entropy_coef, 0.0]})
    for k, v in alone["metrics"].items():
        np.testing.assert_allclose(np.asarray(swept["metrics"][k][0]), np.asarray(v[0]),
                                   rtol=1e-4, atol=1e-4, err_msg=k)
    bonus = np.asarray(swept["metrics"]["train/loss/entropy"])
    assert (bonus[1] == 0.0).all() and (bonus[0] < 0.0).all()


def test_sweep_values_are_checked():
    bed = make_testbed("uec", steps=1, eval_every=1)
    with pytest.raises(LossConfigError, match="alpha"):
        bed.run(seeds=[0], sweep={"alpha": [-1.0]})
    with pytest.raises(LossConfigError, match="cannot be traced"):
        bed.loss_cfg.with_traced(beta=jnp.float32(0.0))
    with pytest.raises(ValueError, match="one value per seed"):
        bed.run(seeds=[0, 1], sweep={"alpha": [0.1]})


def test_traced_aer_update_equals_the_host_update():
    loss_cfg = loss_config("aer", aer_eta=0.05, aer_alpha_max=0.08)
    for h0, alpha, entropy in [(1.0, 0.02, 0.3), (1.0, 0.07, 0.1), (0.5, 0.01, 2.0), (np.nan, 0.03, 0.2)]:
        control = init_control_state(loss_cfg, 0, None if np.isnan(h0) else h0).replace(aer_alpha=jnp.float32(alpha))
        want = update_control(control, {"entropy": jnp.float32(entropy)}, loss_cfg)
        got = jax.jit(lambda c, e: update_control_traced(c, e, loss_cfg))(control, jnp.float32(entropy))
        np.testing.assert_allclose(float(got.aer_alpha), float(want.aer_alpha), rtol=1e-6)


def test_pass_at_k_is_the_exact_combinatorial_probability():
    n = 7
    for c in range(n + 1):
        got = pass_at_k_counts(np.array([c]), n, [1, 2, 3, 7])[0]
        for k, g in zip([1, 2, 3, 7], got):
            subsets = list(itertools.combinations(range(n), k))
            want = sum(any(i < c for i in s) for s in subsets) / math.comb(n, k)
            assert abs(g - want) < 1e-12
            assert abs(g - pass_at_k(n, c, k)) < 1e-12
    with pytest.raises(ValueError):
        pass_at_k_counts([1], 4, [8])


def test_methods_without_a_compiled_form_say_so():
    with pytest.raises(ValueError, match="replay"):
        loop_config("uec_code")
