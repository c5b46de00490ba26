"""Per-host rollouts: each process's share of the batch rows (`Hosts.of_mesh`), reading
and placing a share's rows (`Hosts.take`, `Hosts.put`), the sampler's share blocks, and the rollout's
agreement between shares (rounds, exploration, replay, metrics), with two shares run as two
threads that all-gather through a barrier, as two processes would."""

import threading

import itertools
import numpy as np
import pytest
import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from test_rollout import ScriptedSampler, decode_with, grade, score
from train_helpers import tiny_model
from uecjax.objectives.methods import loss_config
from uecjax.rollout import Prompt, Rollout, RolloutConfig, merge_share_stats, rollout_config
from uecjax.rows import Rows
from uecjax.sampler import Sampler, SamplingParams
from uecjax.parallel.hosts import Hosts
from uecjax.parallel.mesh import batch_sharding, make_mesh, param_shardings


# ---- which rows a process holds ----

def shares(axes, process_of, processes):
    mesh = make_mesh(axes)
    return [Hosts.of_mesh(mesh, p, process_of) for p in range(processes)]


def test_each_process_holds_one_block_of_the_rows():
    by_half = lambda d: d.id // 4  # noqa: E731  (2 processes, 4 devices each)
    assert shares((2, 2, 2), by_half, 2) == [Hosts(0, 2, (0, 1)), Hosts(1, 2, (0, 1))]
    assert shares((1, 4, 2), by_half, 2) == [Hosts(0, 2, (0, 1)), Hosts(1, 2, (0, 1))]
    by_quarter = lambda d: d.id // 2  # noqa: E731  (4 processes)
    assert shares((8, 1, 1), by_quarter, 4) == [Hosts(i, 4, (0, 1, 2, 3)) for i in range(4)]
    # tensor=4 spans two processes: processes 0 and 1 hold the same rows, 2 and 3 the others.
    assert shares((2, 1, 4), by_quarter, 4) == [Hosts(0, 2, (0, 2)), Hosts(0, 2, (0, 2)),
                                               Hosts(1, 2, (0, 2)), Hosts(1, 2, (0, 2))]
    assert Hosts(1, 2).block(10) == slice(5, 10) and Hosts().block(10) == slice(0, 10)


def test_processes_without_a_block_of_their_own_take_the_whole_batch():
    alternate = lambda d: d.id % 2  # noqa: E731
    # tensor across the two processes: both hold every row.
    assert shares((4, 1, 2), alternate, 2) == [Hosts(0, 1, (0,))] * 2
    # rows 0, 2, 4, 6 on process 0: not one consecutive block.
    assert shares((8, 1, 1), alternate, 2) == [Hosts(0, 1, (0,))] * 2


def test_share_rows_reads_a_block_from_its_devices():
    mesh = make_mesh((4, 2, 1))
    host = np.arange(16 * 3).reshape(16, 3)
    split = jax.device_put(host, batch_sharding(mesh))
    np.testing.assert_array_equal(Hosts(1, 2, (0, 1)).take(split), host[8:])
    np.testing.assert_array_equal(Hosts(0, 4, (0, 1, 2, 3)).take(split), host[:4])
    np.testing.assert_array_equal(Hosts().take(split), host)
    whole = jax.device_put(host, NamedSharding(mesh, PartitionSpec()))  # no block layout: sliced
    np.testing.assert_array_equal(Hosts(1, 2, (0, 1)).take(whole), host[8:])
    columns = jax.device_put(host[:, :2], NamedSharding(mesh, PartitionSpec(None, "fsdp")))
    np.testing.assert_array_equal(Hosts(1, 2, (0, 1)).take(columns), host[8:, :2])
    placed = Hosts().put({"x": host, "none": None}, batch_sharding(mesh))
    assert placed["none"] is None and placed["x"].sharding == batch_sharding(mesh)


# ---- the sampler's blocks ----

def test_sampler_returns_the_rows_of_its_block():
    """Two blocks of 3 prompts (each padded on its own): block b's rows are the rows of its
    prompts; greedy rows equal a call with those prompts alone, and with 2 prompts a block
    (no padding) sampled rows equal the one-block call's rows exactly."""
    mesh = make_mesh((4, 1, 2))
    model = tiny_model(seed=1, scale=3.0)
    graphdef, state = nnx.split(model)
    sampler = Sampler(nnx.merge(graphdef, jax.device_put(state, param_shardings(mesh, state))),
                      mesh=mesh)
    prompts = [[5, 6, 7], [12, 13], [14, 15, 16, 17], [3, 4], [8], [9, 10, 11]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0, n=2)
    for b in range(2):
        own = sampler(prompts, greedy, hosts=Hosts(b, 2, (0, 1)))
        alone = sampler(prompts[3 * b: 3 * b + 3], greedy)
        assert own.response_tokens.shape == (6, 6)
        for field in ("prompt_tokens", "response_tokens", "response_mask", "truncated"):
            np.testing.assert_array_equal(getattr(own, field), getattr(alone, field), field)
    sampled = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=3)
    whole = sampler(prompts[:4], sampled)
    for b in range(2):
        own = sampler(prompts[:4], sampled, hosts=Hosts(b, 2, (0, 1)))
        np.testing.assert_array_equal(own.response_tokens, whole.response_tokens[4 * b: 4 * b + 4])
    with pytest.raises(ValueError, match="5 prompts do not make 2 equal blocks"):
        sampler(prompts[:5], greedy, hosts=Hosts(0, 2, (0, 1)))


# ---- two shares of one rollout ----

class BarrierExchange:
    """The all-gather of two threads standing in for two processes."""

    def __init__(self, count):
        self.barrier = threading.Barrier(count, timeout=60)
        self.slots = [None] * count

    def of(self, index):
        def exchange(obj):
            self.slots[index] = obj
            self.barrier.wait()
            out = list(self.slots)
            self.barrier.wait()
            return out
        return exchange


def prompts_of_block(block, count, per_batch):
    """The prompt ids of block `block` of every batch of the stream 1, 2, 3, ..."""
    size = per_batch // count
    for batch in itertools.count():
        for i in range(size):
            yield Prompt(ids=[batch * per_batch + block * size + i + 1, 100], answer="x")


def run_shares(cfg, success, method, count, steps=1):
    """Each share's ([(rows, stats)] per step, sampler calls, [(replay FIFO length, replay
    batch or None)] per step), the shares running concurrently."""
    exchange = BarrierExchange(count)
    results = [None] * count
    decode = decode_with(lambda ids: "ok" if ids[1] == 2 else "no")

    def one(b):
        hosts = Hosts(b, count, tuple(range(count)), exchange.of(b) if count > 1 else None)
        sampler = ScriptedSampler(success)
        rollout = Rollout(cfg, loss_config(method), sampler=sampler,
                          prompts=prompts_of_block(b, count, cfg.prompts_per_batch),
                          grade=grade, score=score, decode=decode, stop_token_ids=(),
                          hosts=hosts)
        out, replays = [], []
        for step in range(1, steps + 1):
            rows, stats = rollout.collect(None)
            rollout.remember_for_replay(rows)
            out.append((rows, stats))
            replays.append((len(rollout.replay),
                            rollout.replay_batch(step, np.random.default_rng((step, b)), None)))
        results[b] = (out, sampler.calls, replays)

    threads = [threading.Thread(target=one, args=(b,)) for b in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a share did not finish (deadlock?)"
    return results


def test_two_shares_make_the_one_share_batch():
    """Without selective rows, the shares' rows in block order are the one-share batch, and
    both report the one-share metrics."""
    cfg = RolloutConfig(prompts_per_batch=4, group_size=4, max_prompt_len=4, max_new_tokens=6)
    success = lambda i, j, T: j < i % 4  # noqa: E731
    (whole,) = run_shares(cfg, success, "grpo", 1, steps=2)
    halves = run_shares(cfg, success, "grpo", 2, steps=2)
    for step in range(2):
        rows, stats = whole[0][step]
        joined = Rows.concat([h[0][step][0] for h in halves])
        for field in ("prompt_tokens", "response_tokens", "advantage", "success_rate", "reward"):
            np.testing.assert_array_equal(getattr(joined, field), getattr(rows, field), field)
        for h in halves:
            assert len(h[0][step][0]) == 8
            got = h[0][step][1]
            for key in ("reward", "accuracy", "response_length", "rollout/kept_fraction",
                        "sampled_tokens", "rollout/rounds"):
                assert got[key] == pytest.approx(stats[key]), key


def test_shares_agree_on_exploration_rounds_and_replay():
    """Only share 0's prompts are hard: both shares make the same sampler calls (share 1
    pads the exploration call and keeps none of its rows), the same number of rounds, and
    the same merged metrics; each returns its half of the batch."""
    # retain_gated=False: hard prompts' regular rows are dropped, so rounds and FIFO lengths
    # differ between the shares (the gated default is test_gated_rows_and_prompt_metrics_...).
    # replay_recompute: the rescoring of a replay draw agrees between the shares too.
    cfg = rollout_config("uec", prompts_per_batch=4, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore_samples=8, replay=True, replay_every=1,
                         replay_min_advantage=0.5, retain_gated=False, replay_recompute=True)

    def success(i, j, T):  # block 0 holds prompts 1, 2 of each batch of 4
        hard = (i - 1) % 4 < 2 and i % 2 == 1
        if T > 1.0:
            return j == 3
        return False if hard else j < 1 + i % 3

    (a_out, a_calls, a_replays), (b_out, b_calls, b_replays) = run_shares(
        cfg, success, "uec", 2, steps=4)
    assert a_calls == b_calls and any(temp > 1.0 for _, _, temp in a_calls)
    for (a_rows, a_stats), (b_rows, b_stats) in zip(a_out, b_out):
        assert len(a_rows) == len(b_rows) == 8
        assert a_stats == b_stats
        assert not b_rows.explore.any()
    assert any(rows.explore.any() for rows, _ in a_out)
    assert sum(stats["explore/kept"] for _, stats in a_out) >= 1
    # Replay is taken by both shares or by neither: at step 3 share 0's FIFO holds its half
    # of a batch (8 rows) and share 1's does not; at step 4 both do.
    assert [n for n, _ in a_replays] == [2, 6, 8, 12] and [n for n, _ in b_replays] == [3, 5, 6, 9]
    assert [r is None for _, r in a_replays] == [r is None for _, r in b_replays] == [True] * 3 + [False]
    assert len(a_replays[3][1]) == len(b_replays[3][1]) == 8


def test_gated_rows_and_prompt_metrics_of_two_shares_are_the_one_share_ones():
    """UEC with the section-6 gate: every fourth prompt fails every sample (hard, w_q = 1),
    the others are mixed, so every regular row stays and one round fills every share; the
    merged per-prompt metrics and the regular rows' entropy are the one-share values."""
    cfg = rollout_config("uec", prompts_per_batch=4, group_size=4, max_prompt_len=4,
                         max_new_tokens=6, explore_samples=8)
    success = lambda i, j, T: j == 3 if T > 1.0 else j < i % 4  # noqa: E731
    (whole,) = run_shares(cfg, success, "uec", 1)
    halves = run_shares(cfg, success, "uec", 2)
    rows, stats = whole[0][0]
    assert stats["rollout/rounds"] == 1 and not rows.explore.any()  # exploration rows wait
    assert ((rows.advantage == 0) == (rows.success_rate == 0)).all()  # the hard rows stayed
    joined = Rows.concat([h[0][0][0] for h in halves])
    np.testing.assert_array_equal(joined.response_tokens, rows.response_tokens)
    for h in halves:
        got = h[0][0][1]
        for key in ("rollout/gate_mean", "rollout/hard_prompt_fraction", "rollout/regular_entropy",
                    "rollout/regular_tokens", "rollout/rounds", "explore/prompts"):
            assert got[key] == pytest.approx(stats[key]), key
    # Prompts 1..4: p_q = 1/4, 2/4, 3/4, 0 -> linear gate (tau 0.5) 0.5, 0, 0, 1.
    assert stats["rollout/hard_prompt_fraction"] == 0.25
    assert stats["rollout/gate_mean"] == pytest.approx(1.5 / 4)
    assert stats["rollout/regular_tokens"] == 16 * 6 and stats["explore/prompts"] == 1


def test_merged_statistics_add_counts_and_take_the_slowest_time():
    merged = merge_share_stats([{"responses": 4, "time/sampling": 2.0}, {"responses": 6, "time/sampling": 3.0}])
    assert merged == {"responses": 10, "time/sampling": 3.0}


def test_rollout_needs_equal_prompt_blocks():
    cfg = RolloutConfig(prompts_per_batch=3, group_size=2)
    kw = dict(sampler=None, prompts=iter(()), grade=grade, score=score, decode=str, stop_token_ids=())
    with pytest.raises(ValueError, match="prompts_per_batch=3 is not a multiple of the 2 row shares"):
        Rollout(cfg, loss_config("grpo"), hosts=Hosts(0, 2, (0, 1), lambda x: [x, x]), **kw)


def test_hosts_gather_is_local_with_one_share_and_the_exchange_with_several():
    assert Hosts().gather({"a": 1}) == [{"a": 1}]
    assert Hosts(1, 2, (0, 1), lambda x: [0, x]).gather(5) == [0, 5]
    assert Hosts(1, 2, (0, 1), lambda x: []) == Hosts(1, 2, (0, 1))  # the stand-in is no part of it
