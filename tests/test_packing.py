"""Sequence packing (`uecjax.packing`, train.pack): the layout holds every real token once, in
order, each in its own segment and block; the packed scoring pass and the packed train step
give the unpacked ones' log-probs, parameters and metrics, for every loss family, with
micro-batches and on a data x fsdp x tensor = 2 x 2 x 2 mesh (VL: tests/test_vl_rl.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import P, R, SGD_LIKE, host, perturbed, random_batch, single_mesh, tiny_model, with_logprobs
from uecjax.objectives.methods import loss_config
from uecjax.packing import first_fit, pack, packed_rows_bucket
from uecjax.parallel.mesh import make_mesh
from uecjax.train_step import TrainStep


def test_layout_holds_every_real_token_once_within_its_block():
    batch = random_batch(B=16, seed=3)
    mask = batch.attention_mask
    shards, micro = 2, 2
    packing = pack(mask, R, shards=shards, micro_batches=micro)
    T1 = mask.shape[1] - 1
    b = 16 // (shards * micro)
    p = packing.source.shape[0] // (shards * micro)
    seen = np.zeros_like(mask[:, :-1])
    for d in range(shards):
        for m in range(micro):
            rows = [m + micro * (d * b + j) for j in range(b)]  # this block's rows, local order
            packed = [d * p * micro + j * micro + m for j in range(p)]
            src, seg = packing.source[packed], packing.segments[packed]
            for local, row in enumerate(rows):
                slots = seg == local
                cols = src[slots] - local * T1
                # the row's real inputs, in order, contiguous in one packed row
                np.testing.assert_array_equal(cols, np.flatnonzero(mask[row, :-1]))
                assert len(np.unique(np.nonzero(slots)[0])) <= 1
                seen[row, cols] += 1
                # the response window's predicting slots hold input column P - 1 + t
                flat_src = src.reshape(-1)
                for t in np.flatnonzero(batch.response_mask[row]):
                    assert flat_src[packing.response_slot[row, t]] == local * T1 + P - 1 + t
    np.testing.assert_array_equal(seen, mask[:, :-1])


def test_first_fit_and_buckets():
    assert sorted(map(sorted, first_fit([5, 3, 4, 2, 6], 8))) == [[0, 1], [2], [3, 4]]  # longest first
    with pytest.raises(ValueError, match="tokens_per_row=4"):
        first_fit([5], 4)
    assert [packed_rows_bucket(n, 8) for n in (0, 1, 3, 5, 8)] == [1, 1, 3, 5, 8]
    assert [packed_rows_bucket(n, 32) for n in (1, 5, 10, 29)] == [4, 8, 12, 32]  # 8 buckets
    assert packed_rows_bucket(5, 6) == 5 and packed_rows_bucket(7, 6) == 6  # at most the rows
    fewer = pack(random_batch(B=8, seed=1).attention_mask, R, tokens_per_row=32)
    assert fewer.source.shape == (2, 32)  # 8 short rows fit 2 rows of 32 slots


def test_bad_rows_are_named():
    mask = np.array([[1, 0, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="one contiguous run"):
        pack(mask, 4)
    with pytest.raises(ValueError, match="do not split into 2 shards"):
        pack(np.ones((3, 9), np.int32), 4, shards=2)


CASES = {
    "grpo": dict(method="grpo", beta=0.0),
    "dapo": dict(method="dapo", beta=0.0),
    "uec": dict(method="uec", beta=0.05, alpha=0.05, lam=2.0),
    "kl_cov": dict(method="kl_cov", beta=0.0, cov_frac=0.2, agg="seq-mean-token-mean"),
    "clip_cov": dict(method="clip_cov", beta=0.0, cov_frac=0.3, clip_cov_lo=0.05, clip_cov_hi=50.0),
    "aer": dict(method="aer", beta=0.0, agg="seq-mean-token-sum-norm"),
}


def run_step(model, loss_cfg, batch, mesh, *, micro, pack_on, tokens_per_row=0):
    ts = TrainStep(model, loss_cfg, SGD_LIKE, mesh, micro_batches=micro, chunk_size=8,
                   pack=pack_on, tokens_per_row=tokens_per_row)
    params, opt_state, control = ts.init(nnx.state(model), h0=0.5)
    return host(ts.step(params, opt_state, control, batch))


def assert_steps_equal(a, b):
    (pa, _, _, ma), (pb, _, _, mb) = a, b
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert sorted(ma) == sorted(mb)
    for k in ma:
        np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def scored():
    model = tiny_model(seed=2)
    ts = TrainStep(model, loss_config("grpo", beta=0.0), SGD_LIKE, single_mesh(), chunk_size=8)
    params, _, _ = ts.init(nnx.state(model))
    batch = with_logprobs(ts, params, random_batch(B=16, seed=9), ref_params=perturbed(params, 0.05, 3),
                          noise=0.05)
    return model, batch


@pytest.mark.parametrize("head_on_slots", [False, True])
def test_packed_scoring_equals_padded(scored, head_on_slots):
    """The lm-head on the response window or on the packed slots: the same log-probs."""
    model, batch = scored
    for micro, tokens_per_row in ((1, 0), (2, 24)):
        ts = TrainStep(model, loss_config("grpo", beta=0.0), SGD_LIKE, single_mesh(),
                       micro_batches=micro, chunk_size=8)
        params, _, _ = ts.init(nnx.state(model))
        packed = batch.replace(packing=pack(batch.attention_mask, R, tokens_per_row=tokens_per_row,
                                            micro_batches=micro, head_on_slots=head_on_slots))
        want, got = ts.compute_logprobs(params, batch), ts.compute_logprobs(params, packed)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g) * batch.response_mask,
                                       np.asarray(w) * batch.response_mask, rtol=1e-5, atol=1e-6)


def test_packed_step_with_the_head_on_the_slots(scored):
    model, batch = scored
    loss_cfg = loss_config(**CASES["uec"])
    packed = batch.replace(packing=pack(batch.attention_mask, R, tokens_per_row=24,
                                        micro_batches=2, head_on_slots=True))
    assert_steps_equal(run_step(model, loss_cfg, batch, single_mesh(), micro=2, pack_on=False),
                       run_step(model, loss_cfg, packed, single_mesh(), micro=2, pack_on=False))


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_step_equals_padded_for_every_loss_family(scored, case):
    model, batch = scored
    loss_cfg = loss_config(**CASES[case])
    a = run_step(model, loss_cfg, batch, single_mesh(), micro=2, pack_on=False)
    b = run_step(model, loss_cfg, batch, single_mesh(), micro=2, pack_on=True, tokens_per_row=24)
    assert_steps_equal(a, b)
    assert a[3]["clip_frac_low"] + a[3]["clip_frac_high"] > 0  # pi != pi_old: the clip acts


def test_packed_step_on_a_2x2x2_mesh_equals_padded_single_device(scored):
    model, batch = scored
    loss_cfg = loss_config(**CASES["uec"])
    padded = run_step(model, loss_cfg, batch, single_mesh(), micro=2, pack_on=False)
    packed = run_step(model, loss_cfg, batch, make_mesh((2, 2, 2)), micro=2, pack_on=True)
    assert_steps_equal(padded, packed)
