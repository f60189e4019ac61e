"""The pieces of exact resume for every kind of data, in one process: sharding and positions,
per-sample randomness, the data fingerprint, and the errors a user can hit."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler, TensorDataset

import distloop
from data_kinds import HAS_TORCHDATA, KINDS, N, Augmented, LengthBuckets, PositionalLoader, fit, stream
from distloop import CheckpointError, MisconfigurationError
from distloop.data import SampleIndex, ShardedIterable, prepare_loader, sample_generator, set_epoch


def ids_of(loader) -> list[int]:
    return [i for ids, _x, _y in loader for i in ids.tolist()]


def sharded(source, rank: int, world_size: int, workers: int = 0, offset: int = 0, train: bool = True):
    loader = DataLoader(ShardedIterable(source), batch_size=4, num_workers=workers)
    loader = prepare_loader(loader, num_replicas=world_size, rank=rank, seed=0, train=train)
    set_epoch(loader, 0, offset)
    return loader


@pytest.mark.parametrize("source", [Augmented(), stream], ids=["indexable", "stream"])
def test_a_sharded_iterable_splits_an_epoch_over_ranks_and_workers_and_resumes_on_other_ranks(source):
    two = [ids_of(sharded(source, r, 2, workers=2)) for r in range(2)]
    assert sorted(two[0] + two[1]) == list(range(N)) and len(two[0]) == len(two[1])
    if source is not stream:  # an indexable source has a length: 7 batches a rank
        assert [len(sharded(source, r, 2)) for r in range(2)] == [7, 7]
    # 16 samples used on 2 ranks (2 steps), the rest on 3 ranks: 40 = 3 steps of 12, and 4 left for 3 ranks
    first = [i for r in range(2) for i in ids_of(sharded(source, r, 2))[:8]]
    rest = [ids_of(sharded(source, r, 3, workers=2, offset=16)) for r in range(3)]
    assert {len(r) for r in rest} == {12 + 1}  # the last short step: one sample each, one left out
    used = first + [i for r in rest for i in r]
    assert len(used) == len(set(used)) == N - 1
    assert sorted(i for r in (ids_of(sharded(source, r, 3, train=False)) for r in range(3)) for i in r) \
        == list(range(N))  # evaluation: every sample, uneven shards


def test_a_sharded_iterable_needs_a_batch_size_and_fresh_workers():
    with pytest.raises(MisconfigurationError, match="batch_size"):
        prepare_loader(DataLoader(ShardedIterable(stream), batch_size=None), num_replicas=1, rank=0, seed=0,
                       train=True)
    with pytest.raises(MisconfigurationError, match="persistent_workers=False"):
        prepare_loader(DataLoader(ShardedIterable(stream), batch_size=2, num_workers=1, persistent_workers=True),
                       num_replicas=1, rank=0, seed=0, train=True)
    with pytest.raises(TypeError, match="ShardedIterable needs"):
        ShardedIterable(3)


def test_each_sample_draws_the_same_numbers_whichever_worker_or_rank_loads_it():
    def batches(workers: int, world_size: int, rank: int) -> dict[int, torch.Tensor]:
        loader = prepare_loader(DataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=workers),
                                num_replicas=world_size, rank=rank, seed=0, train=True)
        set_epoch(loader, 2)
        return {int(i): x for ids, xs, _ in loader for i, x in zip(ids, xs)}

    one = batches(0, 1, 0)
    two = {**batches(2, 2, 0), **batches(2, 2, 1)}
    assert one.keys() == two.keys() == set(range(N))
    assert all(torch.equal(one[i], two[i]) for i in one)
    augmented = batches(0, 1, 0)
    set_noise = [torch.randn(4, generator=sample_generator(SampleIndex(0, p, 2, 0))) for p in range(2)]
    assert not torch.equal(set_noise[0], set_noise[1]) and torch.equal(augmented[0], one[0])
    assert torch.equal(torch.rand(3, generator=sample_generator(5)), torch.rand(3, generator=sample_generator(5)))
    with pytest.raises(RuntimeError, match="pass the index"):
        sample_generator()


def test_samplers_and_batch_samplers_that_follow_the_protocol_are_sharded_and_others_refused():
    dataset = Augmented()
    buckets = prepare_loader(DataLoader(dataset, batch_sampler=LengthBuckets([2 if i % 8 < 5 else 3 for i in
                                                                            range(N)], 10)),
                             num_replicas=2, rank=1, seed=0, train=True)
    assert len(buckets) == 7 and {len(ids) for ids, _, _ in buckets} == {3, 5}
    torch_batches = prepare_loader(DataLoader(dataset, batch_sampler=BatchSampler(SequentialSampler(dataset), 4,
                                                                                 False)),
                                   num_replicas=2, rank=0, seed=0, train=True)
    assert ids_of(torch_batches)[:8] == [0, 2, 4, 6, 8, 10, 12, 14]

    class NoProtocol(Sampler):
        def __iter__(self):
            return iter(range(N))

        def __len__(self):
            return N

    with pytest.raises(MisconfigurationError, match="NoProtocol cannot be sharded across 2 ranks.*set_epoch"):
        prepare_loader(DataLoader(dataset, batch_size=4, sampler=NoProtocol()), num_replicas=2, rank=0, seed=0,
                       train=True)
    alone = DataLoader(dataset, batch_size=4, sampler=NoProtocol())
    assert prepare_loader(alone, num_replicas=1, rank=0, seed=0, train=True) is alone


class Crash(distloop.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


class NoLength:
    """A stateful loader without a length: distloop reads it one batch ahead."""

    def __init__(self) -> None:
        self.inner = PositionalLoader(0, 1)

    def __iter__(self):
        return iter(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_a_stateful_loader_read_ahead_saves_the_state_of_the_batches_trained_on(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "no_length", lambda rank, ws: NoLength())
    ref = fit("no_length", str(tmp_path / "ref"))
    with pytest.raises(RuntimeError, match="crash"):
        fit("no_length", str(tmp_path / "k"), callbacks=[Crash(18)])
    resumed = fit("no_length", str(tmp_path / "k"))
    assert resumed["seen"] == ref["seen"] and len(ref["seen"]) == 28
    assert all(torch.equal(ref["weights"][k], resumed["weights"][k]) for k in ref["weights"])


def tensors(n: int, seed: int) -> TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(torch.arange(n), x, x.sum(dim=1, keepdim=True))


def test_resuming_on_other_data_is_refused_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "tensors", lambda rank, ws: DataLoader(tensors(N, 1), batch_size=4, shuffle=True))
    with pytest.raises(RuntimeError, match="crash"):
        fit("tensors", str(tmp_path), callbacks=[Crash(6)])
    monkeypatch.setitem(KINDS, "tensors", lambda rank, ws: DataLoader(tensors(N, 2), batch_size=4, shuffle=True))
    with pytest.raises(CheckpointError, match="other data.*resume_with_other_data=True"):
        fit("tensors", str(tmp_path))
    monkeypatch.setitem(KINDS, "tensors", lambda rank, ws: DataLoader(tensors(N, 1), batch_size=4, shuffle=True))
    assert len(fit("tensors", str(tmp_path))["seen"]) == 28  # the same data resumes


def test_the_override_resumes_on_other_data_at_the_saved_position(tmp_path, monkeypatch):
    monkeypatch.setitem(KINDS, "tensors", lambda rank, ws: DataLoader(tensors(N, 1), batch_size=4))
    with pytest.raises(RuntimeError, match="crash"):
        fit("tensors", str(tmp_path), callbacks=[Crash(6)])
    trainer = distloop.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, resume_with_other_data=True)
    from data_kinds import Recorder

    module = Recorder()
    trainer.fit(module, DataLoader(tensors(N + 8, 2), batch_size=4), ckpt_path="last")
    assert module.seen[0][1][0] == 16  # resumed at the step-4 checkpoint (16 samples used): on from sample 16


@pytest.mark.skipif(not HAS_TORCHDATA, reason="torchdata is not installed")
def test_a_stateful_loader_that_would_give_every_rank_the_whole_dataset_is_refused():
    from torchdata.stateful_dataloader import StatefulDataLoader

    loader = StatefulDataLoader(Augmented(), batch_size=4, shuffle=True)
    with pytest.raises(MisconfigurationError, match="StatefulDistributedSampler"):
        prepare_loader(loader, num_replicas=2, rank=0, seed=0, train=True)
    assert prepare_loader(loader, num_replicas=1, rank=0, seed=0, train=True) is loader  # one rank: its own state
