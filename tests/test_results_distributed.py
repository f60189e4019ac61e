"""Result collections across two gloo ranks (spawned processes, deadlines everywhere)."""

import io
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import SumMetric

from _spawn import gloo_reduce, spawn
from distloop import Loop, MisconfigurationError, ResultCollection

pytestmark = pytest.mark.distributed


class EpochLoop(Loop):
    def __init__(self) -> None:
        super().__init__()
        self.results = ResultCollection(training=True)

    @property
    def done(self) -> bool:
        return True

    def reset(self) -> None:
        pass

    def advance(self) -> None:
        pass


class Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = SumMetric()


def _trainer(rank, world_size, module):
    return SimpleNamespace(
        strategy=SimpleNamespace(reduce=gloo_reduce),
        metrics_sync_fn=gloo_reduce,
        module=module,
        is_global_zero=rank == 0,
        world_size=world_size,
    )


def _log(loop, module, rank, values):
    for v in values:
        loop.results.log("training_step", "mean", torch.tensor(v), batch_size=rank + 1, sync_dist=True)
        loop.results.log("training_step", "sum", torch.tensor(v), reduce_fx="sum", sync_dist=True)
        loop.results.log("training_step", "max", torch.tensor(v), reduce_fx="max", sync_dist=True)
        loop.results.log("training_step", "min", torch.tensor(v), reduce_fx="min", sync_dist=True)
        module.seen.update(torch.tensor(v))
        loop.results.log("training_step", "seen", module.seen, metric_attribute="seen")


def _checkpoint_then_resume(rank, world_size):
    before = {0: [1.0, 2.0], 1: [10.0, -4.0]}[rank]
    after = {0: [3.0], 1: [7.0, 20.0]}[rank]

    module = Module()
    loop = EpochLoop()
    loop.trainer = _trainer(rank, world_size, module)
    loop.results.sync_fn = gloo_reduce
    _log(loop, module, rank, before)
    state = loop.state_dict()
    assert state["results"]["synced"] is True
    # Taking the state must not change what this rank holds.
    assert loop.results.state_dict()["items"]["training_step.sum"]["value"].item() == sum(before)

    # Rank zero writes the checkpoint; every rank reads it back.
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = [buf.getvalue() if rank == 0 else None]
    dist.broadcast_object_list(payload, src=0)
    loaded = torch.load(io.BytesIO(payload[0]), weights_only=True)

    module2 = Module()
    resumed = EpochLoop()
    resumed.trainer = _trainer(rank, world_size, module2)
    resumed.load_state_dict(loaded)
    assert resumed.restarting
    _log(resumed, module2, rank, after)
    epoch = resumed.results.metrics(on_step=False).log

    all_values = {0: [1.0, 2.0, 3.0], 1: [10.0, -4.0, 7.0, 20.0]}
    weighted = sum(v * (r + 1) for r, vs in all_values.items() for v in vs)
    weight = sum((r + 1) * len(vs) for r, vs in all_values.items())
    flat = [v for vs in all_values.values() for v in vs]
    assert epoch["mean"].item() == pytest.approx(weighted / weight), (epoch, weighted, weight, resumed.results.state_dict())
    assert epoch["sum"].item() == pytest.approx(sum(flat))
    assert epoch["max"].item() == 20.0
    assert epoch["min"].item() == -4.0
    assert epoch["seen"].item() == pytest.approx(sum(flat))


@pytest.mark.timeout(120)
def test_checkpoint_sync_then_reset_on_non_zero_ranks_gives_global_values():
    spawn(_checkpoint_then_resume, 2)


def _mismatched_keys(rank, world_size):
    r = ResultCollection(training=True)
    r.sync_fn = gloo_reduce
    r.log("training_step", "loss", 1.0, sync_dist=True)
    r.log("training_step", f"only_on_rank_{rank}", 1.0, sync_dist=True)
    start = time.monotonic()
    with pytest.raises(MisconfigurationError) as err:
        r.metrics(on_step=False)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "training_step.only_on_rank_0 (sum, torch.float32): present on ranks [0], missing on ranks [1]" in message
    assert "only_on_rank_1" in message and "training_step.loss" not in message


@pytest.mark.timeout(120)
def test_ranks_logging_different_keys_fail_fast_on_every_rank():
    spawn(_mismatched_keys, 2)


def _count_collectives(rank, world_size):
    calls = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        r = ResultCollection(training=True)
        r.sync_fn = gloo_reduce
        for i in range(20):
            r.log("training_step", f"m{i}", torch.tensor(float(i + rank)), on_step=True, on_epoch=True,
                  batch_size=2, sync_dist=True)
        step = r.metrics(on_step=True).log
        assert len(calls) == 2, calls
        assert step["m3_step"].item() == pytest.approx(3.5)  # mean of 3 and 4 across ranks
        calls.clear()
        epoch = r.metrics(on_step=False).log
        assert len(calls) == 2, calls
        assert epoch["m3_epoch"].item() == pytest.approx(3.5)
        calls.clear()
        r.sync()
        r.unsync()
        assert len(calls) == 2, calls
        # Every later sync point of a kind: one collective, the key check and flags inside it.
        for i in range(20):
            r.log("training_step", f"m{i}", torch.tensor(float(2 * i + rank)), on_step=True, on_epoch=True,
                  batch_size=2, sync_dist=True)
        calls.clear()
        step = r.metrics(on_step=True, flags=1 << rank)
        assert len(calls) == 1, calls
        assert step.log["m3_step"].item() == pytest.approx(6.5)
        assert step.flags == 0b11  # OR over ranks
        calls.clear()
        epoch = r.metrics(on_step=False, flags=4 * rank)
        assert len(calls) == 1, calls
        assert epoch.log["m3_epoch"].item() == pytest.approx(5.0)  # (3 + 4 + 6 + 7) / 4
        assert epoch.flags == 4
    finally:
        dist.all_reduce = real


@pytest.mark.timeout(120)
def test_a_sync_of_twenty_metrics_issues_two_collectives_then_one():
    spawn(_count_collectives, 2)


def _keys_diverging_after_agreement(rank, world_size):
    r = ResultCollection(training=True)
    r.sync_fn = gloo_reduce
    r.log("training_step", "loss", torch.tensor(1.0), on_step=True, sync_dist=True)
    r.metrics(on_step=True)
    r.metrics(on_step=True)
    if rank == 1:
        r.log("training_step", "late", torch.tensor(1.0), on_step=True, sync_dist=True)
    start = time.monotonic()
    with pytest.raises(MisconfigurationError, match=r"training_step.late \(mean, torch.float32\): present on "
                                                    r"ranks \[1\], missing on ranks \[0\]"):
        r.metrics(on_step=True)
    assert time.monotonic() - start < 10
    # Once every rank logs it, the next read agrees on the new keys and reduces them.
    if rank == 0:
        r.log("training_step", "late", torch.tensor(3.0), on_step=True, sync_dist=True)
    assert r.metrics(on_step=True).log["late_step"].item() == 2.0


@pytest.mark.timeout(120)
def test_keys_diverging_after_an_agreed_read_fail_fast_on_every_rank():
    spawn(_keys_diverging_after_agreement, 2)
