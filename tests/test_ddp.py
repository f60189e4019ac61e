"""DDP over gloo on CPU: 2 and 3 ranks in spawned processes, every one with deadlines."""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from _spawn import spawn
from distloop import LoopModule, MisconfigurationError, Trainer
from distloop.data import ResumableSampler
from distloop.strategies import DDPStrategy

pytestmark = pytest.mark.distributed


def regression_data(n=48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


class Regressor(LoopModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def fit(module, loader, **kwargs):
    trainer = Trainer(max_epochs=3, seed=5, logger=False, enable_progress_bar=False, accelerator="cpu", **kwargs)
    trainer.fit(module, loader)
    return trainer


def _fit_ddp(rank, world_size, out_path, per_rank_batch):
    module = Regressor()
    trainer = fit(module, DataLoader(regression_data(), batch_size=per_rank_batch, shuffle=True), strategy="ddp")
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.world_size == world_size
    assert trainer.global_step == 3 * 48 // (per_rank_batch * world_size)
    if rank == 0:
        torch.save(module.state_dict(), out_path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_fit_equals_one_process_on_the_same_global_batches(tmp_path, world_size):
    per_rank = 4
    spawn(_fit_ddp, world_size, str(tmp_path / "ddp.pt"), per_rank, init=False)
    single = Regressor()
    fit(single, DataLoader(regression_data(), batch_size=per_rank * world_size, shuffle=True))
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fit_then_count_threads(rank, world_size, out_path, per_rank_batch):
    before = _threads()
    _fit_ddp(rank, world_size, out_path, per_rank_batch)
    # Teardown destroys the group on the spot: no gloo thread is left to race interpreter exit
    # (it used to abort there, freeing a tensor after the GIL was gone).
    assert _threads() == before


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_teardown_joins_the_groups_threads(tmp_path):
    spawn(_fit_then_count_threads, 2, str(tmp_path / "ddp.pt"), 4, init=False)


def uneven_classification(n=25):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


class Classifier(LoopModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(6, 3)
        self.acc = MulticlassAccuracy(num_classes=3, average="micro")

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.layer(x)
        self.acc(logits, y)
        self.log("val_acc", self.acc)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_count", float(len(y)), reduce_fx="sum", sync_dist=True)


def _validate(rank, world_size, results):
    trainer = Trainer(strategy="ddp", accelerator="cpu", logger=False, enable_progress_bar=False)
    [metrics] = trainer.validate(Classifier(), DataLoader(uneven_classification(), batch_size=4))
    if rank == 0:
        torch.save(metrics, results)


@pytest.mark.timeout(180)
def test_validation_metrics_on_uneven_shards_equal_one_process(tmp_path):
    spawn(_validate, 2, str(tmp_path / "m.pt"), init=False)
    ddp = torch.load(tmp_path / "m.pt", weights_only=True)
    [single] = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").validate(
        Classifier(), DataLoader(uneven_classification(), batch_size=4))
    assert ddp["val_count"] == single["val_count"] == 25.0  # no padding sample counted
    assert ddp["val_acc"] == single["val_acc"]
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)


class Divergent(Regressor):
    def training_step(self, batch, batch_idx):
        self.log(f"only_rank_{self.trainer.global_rank}", 1.0, sync_dist=True)
        return super().training_step(batch, batch_idx)


def _divergent(rank, world_size):
    start = time.monotonic()
    with pytest.raises(MisconfigurationError, match="only_rank_0.*present on ranks \\[0\\]"):
        fit(Divergent(), DataLoader(regression_data(), batch_size=4), strategy="ddp", log_every_n_steps=2)
    assert time.monotonic() - start < 20


@pytest.mark.timeout(120)
def test_divergent_keys_raise_on_every_rank():
    spawn(_divergent, 2, init=False)


def _decisions(rank, world_size):
    strategy = DDPStrategy(accelerator="cpu")
    strategy.setup_environment()
    try:
        assert strategy.reduce(torch.tensor(float(rank + 1)), "mean").item() == 1.5
        assert strategy.reduce(torch.tensor(float(rank + 1)), "max").item() == 2.0
        assert strategy.reduce(torch.tensor(float(rank + 1)), "min").item() == 1.0
        assert strategy.reduce(torch.tensor(float(rank + 1)), "sum").item() == 3.0
        assert strategy.broadcast({"from": rank}, src=1) == {"from": 1}
        assert strategy.all_gather(torch.tensor([rank])).tolist() == [[0], [1]]
        assert strategy.reduce_boolean_decision(rank == 0, all=False) is True
        assert strategy.reduce_boolean_decision(rank == 0, all=True) is False
        strategy.barrier()
    finally:
        strategy.teardown()
    assert not dist.is_initialized()


@pytest.mark.timeout(120)
def test_ddp_strategy_collectives():
    spawn(_decisions, 2, init=False)


def test_resumable_sampler_shards_without_loss():
    n = 10
    shards = [list(ResumableSampler(n, 3, r, shuffle=True, seed=4, pad=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(n))
    padded = [list(ResumableSampler(n, 3, r, shuffle=True, seed=4, pad=True)) for r in range(3)]
    assert {len(s) for s in padded} == {4} and set(sum(padded, [])) == set(range(n))
    # The global position: skipping the first k samples of the epoch, on any world size.
    full = list(ResumableSampler(n, 1, 0, shuffle=True, seed=4))
    resumed = []
    for r in range(2):
        sampler = ResumableSampler(n, 2, r, shuffle=True, seed=4)
        sampler.set_epoch(0, offset=4)
        resumed += list(sampler)
    assert sorted(resumed) == sorted(full[4:])
    other_epoch = ResumableSampler(n, 1, 0, shuffle=True, seed=4)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != full


def test_resumed_last_batches_repeat_the_samples_an_uninterrupted_epoch_repeats():
    n, ranks, offset = 11, 2, 8  # 11 samples on 2 ranks: the epoch pads one; resume in its last batches
    for rank in range(ranks):
        whole = list(ResumableSampler(n, ranks, rank, shuffle=True, seed=4))
        resumed = ResumableSampler(n, ranks, rank, shuffle=True, seed=4)
        resumed.set_epoch(0, offset=offset)
        assert list(resumed) == whole[offset // ranks:]


def _rank_zero(rank, world_size, path):
    from distloop import rank_zero_only

    @rank_zero_only
    def write(text):
        with open(path, "a") as f:
            f.write(text)
        return "wrote"

    assert write(f"rank {rank}\n") == ("wrote" if rank == 0 else None)


@pytest.mark.timeout(120)
def test_rank_zero_only_runs_once(tmp_path):
    spawn(_rank_zero, 2, str(tmp_path / "out.txt"), init=False)
    assert (tmp_path / "out.txt").read_text() == "rank 0\n"


def _evaluate_three_times(rank, world_size):
    trainer = Trainer(strategy="ddp", accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False)
    module = Classifier()
    data = DataLoader(uneven_classification(), batch_size=4)
    for _ in range(3):  # each entry point makes and destroys its own process group
        [metrics] = trainer.validate(module, data)
        assert metrics["val_count"] == 25.0
    assert not dist.is_initialized()


@pytest.mark.timeout(180)
def test_entry_points_can_follow_one_another(tmp_path):
    spawn(_evaluate_three_times, 2, init=False)


class StopsOnRankOne(Regressor):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and batch_idx == 2:
            self.trainer.should_stop = True  # one rank only: the ranks agree at the next metrics read
        return super().training_step(batch, batch_idx)


def _stop_on_one_rank(rank, world_size, out):
    trainer = fit(StopsOnRankOne(), DataLoader(regression_data(), batch_size=4), strategy="ddp", log_every_n_steps=2)
    torch.save({"step": trainer.global_step, "stopping": trainer.stopping}, f"{out}-{rank}.pt")


@pytest.mark.timeout(180)
def test_should_stop_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    spawn(_stop_on_one_rank, 2, str(tmp_path / "r"), init=False)
    results = [torch.load(tmp_path / f"r-{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0] == results[1] == {"step": 4, "stopping": True}  # set at batch 2, agreed at the read after batch 4


def _write_fails_on_rank_zero(rank, world_size, root, out):
    import errno

    import distloop.checkpoint as checkpoint_files
    from distloop import CheckpointError, ModelCheckpoint

    writes = []
    real = checkpoint_files.write_atomic

    def full_disk_at_the_second_write(state, path):
        writes.append(path)
        if len(writes) == 2:
            raise checkpoint_files.CheckpointError(
                f"Could not write checkpoint {path}: {os.strerror(errno.ENOSPC)} (while writing). "
                "Earlier checkpoints are intact.")
        real(state, path)

    checkpoint_files.write_atomic = full_disk_at_the_second_write  # only rank 0 writes
    steps = []

    class Steps(Regressor):
        def training_step(self, batch, batch_idx):
            steps.append(self.trainer.global_step)
            return super().training_step(batch, batch_idx)

    callback = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
    try:
        fit(Steps(), DataLoader(regression_data(), batch_size=4), strategy="ddp", log_every_n_steps=3,
            callbacks=[callback])
    except CheckpointError as err:
        torch.save({"error": str(err), "last_step": steps[-1]}, f"{out}-{rank}.pt")
        return
    raise AssertionError(f"rank {rank}: fit did not raise")


@pytest.mark.timeout(180)
def test_a_failed_checkpoint_write_stops_every_rank_with_an_error(tmp_path):
    spawn(_write_fails_on_rank_zero, 2, str(tmp_path / "ckpt"), str(tmp_path / "r"), init=False)
    results = [torch.load(tmp_path / f"r-{rank}.pt", weights_only=True) for rank in range(2)]
    assert "No space left on device" in results[0]["error"] and "step=2" in results[0]["error"]
    assert "Another rank could not write a checkpoint" in results[1]["error"]
    assert results[0]["last_step"] == results[1]["last_step"] < 8  # agreed at a read, long before the end (18 steps)


class NanOnRankOne(Regressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_rank == 1 and batch_idx == 2 else loss


def _nan_on_one_rank(rank, world_size, out):
    try:
        fit(NanOnRankOne(), DataLoader(regression_data(), batch_size=4), strategy="ddp")
    except Exception as err:  # noqa: BLE001 - the test checks which
        torch.save({"type": type(err).__name__, "message": str(err)[:300]}, f"{out}-{rank}.pt")
        return
    raise AssertionError(f"rank {rank}: fit did not raise")


@pytest.mark.timeout(180)
def test_a_non_finite_loss_on_one_rank_stops_every_rank_fast(tmp_path):
    started = time.monotonic()
    spawn(_nan_on_one_rank, 2, str(tmp_path / "r"), init=False, timeout=60)
    results = [torch.load(tmp_path / f"r-{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[1]["type"] == "FloatingPointError" and "global step 2" in results[1]["message"]
    assert results[0]["type"] != "AssertionError"  # rank 0 failed too (its peer left), instead of hanging
    assert time.monotonic() - started < 60


def _timed_saves(rank, world_size, root):
    from datetime import timedelta

    from distloop import ModelCheckpoint

    callback = ModelCheckpoint(dirpath=root, train_time_interval=timedelta(microseconds=1), save_top_k=-1)
    trainer = fit(Regressor(), DataLoader(regression_data(), batch_size=4), strategy="ddp", log_every_n_steps=3,
                  callbacks=[callback])
    assert trainer.global_step == 18


@pytest.mark.timeout(180)
def test_timed_saves_are_agreed_across_ranks(tmp_path):
    spawn(_timed_saves, 2, str(tmp_path / "ckpt"), init=False)
    steps = sorted(int(name.split("step=")[1].split(".")[0]) for name in os.listdir(tmp_path / "ckpt"))
    # Requested every batch, agreed at each read (every 3 batches, and at each epoch's end): saved after it.
    assert steps == [3, 6, 9, 12, 15, 18]
