"""Per-host prompt shards (issue 6, step one), simulated in one process: each host's block of
every global batch, the exchange that rebuilds the global batch, per-process iterator states."""

import itertools

import pytest

from uecjax.config import base_config
from uecjax.data import demo_source, make_dataset, make_iterator, shard_batches
from uecjax.models import CheckpointError
from uecjax.parallel.gather import allgather_objects
from uecjax.parallel.hosts import GlobalPrompts
from uecjax.run_state import own_iterator_state
from uecjax.setup import make_records


@pytest.fixture(scope="module")
def demo():
    return demo_source("train", 23, seed=0)  # 23: batches of 4 leave a partial last one


def key(record):
    return record.id, record.prompt


@pytest.mark.parametrize("count", [2, 4])
def test_blocks_in_host_order_are_the_one_host_epoch(demo, count):
    batch = 4
    whole = [key(r) for r in make_dataset(demo, seed=5, num_epochs=1)]
    shards = [[key(r) for r in shard_batches(make_dataset(demo, seed=5, num_epochs=1), batch, i, count)]
              for i in range(count)]
    # Disjoint, and together one epoch.
    flat = [k for s in shards for k in s]
    assert len(flat) == len(set(flat)) == len(demo)
    assert set(flat) == set(whole)
    # Interleaving the hosts' blocks batch by batch gives the one-host order exactly.
    k = batch // count
    rebuilt = []
    for b in range(-(-len(demo) // batch)):
        for s in shards:
            rebuilt += s[b * k:(b + 1) * k]
    assert rebuilt == whole


def test_endless_stream_across_epochs(demo):
    """The training stream (repeat forever, reshuffled per epoch): 3 epochs' worth of global
    batches from 2 hosts equal the one-host stream."""
    ds = make_dataset(demo, seed=1, num_epochs=None)
    hosts = [iter(shard_batches(ds, 6, i, 2)) for i in range(2)]
    one = iter(ds)
    for _ in range(3 * len(demo) // 6 + 1):
        glob = [key(r) for h in hosts for r in itertools.islice(h, 3)]
        assert glob == [key(r) for r in itertools.islice(one, 6)]


def test_one_host_is_unchanged(demo):
    ds = make_dataset(demo, seed=1)
    assert shard_batches(ds, 4, 0, 1) is ds


def test_bad_shards_are_rejected(demo):
    ds = make_dataset(demo, seed=1)
    with pytest.raises(ValueError, match="batch_size=5 is not a positive multiple of shard_count=2"):
        shard_batches(ds, 5, 0, 2)
    with pytest.raises(ValueError, match="shard_index=2, shard_count=2"):
        shard_batches(ds, 4, 2, 2)


def test_each_host_iterator_state_restores_its_own_position(demo):
    def host_iter(i):
        return make_iterator(shard_batches(make_dataset(demo, seed=3), 4, i, 2))

    its = [host_iter(i) for i in range(2)]
    for it, n in zip(its, (5, 7)):
        for _ in range(n):
            next(it)
    states = [it.get_state() for it in its]
    assert states[0] != states[1]
    for i, it in enumerate(its):
        again = host_iter(i)
        again.set_state(states[i])
        assert [key(next(again)) for _ in range(9)] == [key(next(it)) for _ in range(9)]


def config(prompts_per_batch=4):
    c = base_config()
    c.data.kind = "demo"
    c.demo_data.update(num_train=30, num_eval=4, levels=(1,), style="expression")
    c.rollout.prompts_per_batch = prompts_per_batch
    return c


@pytest.mark.parametrize("count", [2, 4])
def test_exchange_gives_every_process_the_one_process_batches(count):
    """make_records' per-process streams + GlobalPrompts with a simulated all-gather (process
    0's view: its own block, then the other processes' next blocks) = the one-process stream."""
    cfg = config(prompts_per_batch=4)
    _, single = make_records(cfg, "train", train=True)
    assert make_records(cfg, "train", train=True, shard=(0, 1))[1].get_state() == single.get_state()
    locals_ = [make_records(cfg, "train", train=True, shard=(i, count))[1] for i in range(count)]
    k = 4 // count

    def exchange(mine):
        return [mine] + [[next(it) for _ in range(k)] for it in locals_[1:]]

    prompts = GlobalPrompts(locals_[0], 4, count, exchange=exchange)
    got = [key(next(prompts)) for _ in range(4 * 12)]  # 48 prompts: more than one epoch of 30
    assert got == [key(next(single)) for _ in range(4 * 12)]
    assert len(set(got[:28])) == 28  # no record twice within the first epoch's batches
    assert not prompts.pending  # whole batches drawn: nothing buffered between steps


def test_one_process_passes_the_stream_through():
    stream = iter(range(10))
    prompts = GlobalPrompts(stream, 4, 1, exchange=lambda mine: pytest.fail("no exchange"))
    assert list(itertools.islice(prompts, 10)) == list(range(10))
    with pytest.raises(ValueError, match="batch_size=3 is not a multiple of process_count=2"):
        GlobalPrompts(stream, 3, 2)


def test_allgather_objects_with_one_process():
    assert allgather_objects({"a": [1, 2]}) == [{"a": [1, 2]}]


def test_checkpoint_iterator_state_per_process():
    assert own_iterator_state({"data_iterator": "s"}, 0, 1) == "s"
    meta = {"data_iterator": "s0", "data_iterators": ["s0", "s1"]}
    assert [own_iterator_state(meta, i, 2) for i in range(2)] == ["s0", "s1"]
    with pytest.raises(CheckpointError, match="states of 2 processes, this run has 4"):
        own_iterator_state(meta, 0, 4)
    with pytest.raises(CheckpointError, match="holds one data iterator state, this run has 2"):
        own_iterator_state({"data_iterator": "s"}, 0, 2)
