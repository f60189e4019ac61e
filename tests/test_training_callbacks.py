"""LearningRateMonitor, BaseFinetuning / BackboneFinetuning and Timer: Lightning's behaviour, exact resume, DDP."""

from __future__ import annotations

import csv
import glob
import os
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import Callback, LoopModule, MisconfigurationError, ModelCheckpoint, Trainer
from distloop.callbacks import BackboneFinetuning, BaseFinetuning, LearningRateMonitor, Timer
from distloop.loggers import CSVLogger


def data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Regressor(LoopModule):
    """A backbone and a head; ``configure_optimizers`` takes only what is trainable, as Lightning asks."""

    def __init__(self, lr: float = 0.1, scheduler: bool = False, wait_at_step: int | None = None,
                 wait_s: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.lr, self.scheduler = lr, scheduler
        self.wait_at_step, self.wait_s = wait_at_step, wait_s

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.wait_at_step:  # a slow step, for the Timer (busy: no sleeping)
            end = time.monotonic() + self.wait_s
            while time.monotonic() < end:
                pass
        x, y = batch
        return F.mse_loss(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=self.lr, momentum=0.9,
                                    weight_decay=0.01)
        if not self.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def trainer(tmp: Any, callbacks: list, **kwargs: Any) -> Trainer:
    options = dict(accelerator="cpu", max_epochs=3, default_root_dir=str(tmp), enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, logger=False)
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def rows(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------ LearningRateMonitor
def test_lr_monitor_follows_an_epoch_scheduler_and_logs_momentum_and_weight_decay(tmp_path: Any) -> None:
    monitor = LearningRateMonitor(log_momentum=True, log_weight_decay=True)
    logger = CSVLogger(tmp_path, name="lr")
    t = trainer(tmp_path, [monitor], logger=logger)
    t.fit(Regressor(scheduler=True), DataLoader(data(), batch_size=8))
    assert monitor.lrs == {"lr-SGD": [0.1, 0.05, 0.025]}  # once per epoch start: the scheduler's interval
    logged = [r for r in rows(os.path.join(logger.log_dir, "metrics.csv")) if r.get("lr-SGD")]
    assert [(int(r["step"]), float(r["lr-SGD"])) for r in logged] == [(0, 0.1), (4, 0.05), (8, 0.025)]
    assert {float(r["lr-SGD-momentum"]) for r in logged} == {0.9}
    assert {float(r["lr-SGD-weight_decay"]) for r in logged} == {0.01}
    assert float(t.callback_metrics["lr-SGD"]) == pytest.approx(0.025)


class TwoOptimizers(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt, layer in zip(self.optimizers(), (self.a, self.b)):
            opt.zero_grad()
            self.manual_backward(F.mse_loss(layer(x), y))
            opt.step()

    def configure_optimizers(self) -> Any:
        first = torch.optim.Adam([{"params": self.a.weight}, {"params": self.a.bias, "lr": 0.5}], lr=0.1)
        second = torch.optim.Adam([{"params": self.b.parameters(), "name": "heads"}], lr=0.2, betas=(0.8, 0.99))
        return [first, second]


def test_lr_monitor_names_several_optimizers_and_param_groups_at_the_logging_steps(tmp_path: Any) -> None:
    monitor = LearningRateMonitor(logging_interval="step", log_momentum=True)
    logger = CSVLogger(tmp_path, name="lr")
    trainer(tmp_path, [monitor], logger=logger, max_epochs=1, log_every_n_steps=2).fit(
        TwoOptimizers(), DataLoader(data(), batch_size=8))
    assert set(monitor.lrs) == {"lr-Adam/pg1", "lr-Adam/pg2", "lr-Adam-1/heads"}
    logged = [r for r in rows(os.path.join(logger.log_dir, "metrics.csv")) if r.get("lr-Adam/pg1")]
    # Logged before the 2nd and 4th batches (log_every_n_steps=2); manual optimization steps twice a batch.
    assert [int(r["step"]) for r in logged] == [2, 6]
    assert {(r["lr-Adam/pg1"], r["lr-Adam/pg2"], r["lr-Adam-1/heads"], r["lr-Adam-1/heads-momentum"])
            for r in logged} == {("0.1", "0.5", "0.2", "0.8")}


def test_lr_monitor_errors(tmp_path: Any) -> None:
    with pytest.raises(MisconfigurationError, match="logging_interval"):
        LearningRateMonitor(logging_interval="batch")
    with pytest.raises(MisconfigurationError, match="has no logger"):
        trainer(tmp_path, [LearningRateMonitor()]).fit(Regressor(), DataLoader(data(), batch_size=8))


# ------------------------------------------------------------ fine-tuning
def test_backbone_finetuning_unfreezes_into_a_new_group_and_schedules_its_lr(tmp_path: Any) -> None:
    model = Regressor()
    start = weights(model.backbone)
    seen = []

    class Watch(Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            seen.append((len(trainer.optimizers[0].param_groups), trainer.optimizers[0].param_groups[-1]["lr"]))

    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5,
                                    backbone_initial_ratio_lr=0.1, should_align=True)
    trainer(tmp_path, [finetuning, Watch()], max_epochs=4).fit(model, DataLoader(data(), batch_size=8))
    assert seen[0] == (1, 0.1)  # epoch 0: the backbone is frozen (its BatchNorm trains: train_bn=True)
    assert seen[1] == (2, pytest.approx(0.01))  # unfrozen at 0.1 * the head's lr
    assert seen[2][1] == pytest.approx(0.015) and seen[3][1] == pytest.approx(0.0225)
    assert not torch.equal(model.backbone[0].weight, start["0.weight"])


class FreezeFirst(BaseFinetuning):
    """Lightning's documented example: freeze in freeze_before_training, unfreeze at an epoch."""

    def freeze_before_training(self, pl_module: Any) -> None:
        self.freeze(pl_module.backbone[0])

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone[0], optimizer, train_bn=True)


def test_base_finetuning_freezes_before_configure_optimizers(tmp_path: Any) -> None:
    model = Regressor()
    frozen = model.backbone[0].weight.clone()
    t = trainer(tmp_path, [FreezeFirst()], max_epochs=1)
    t.fit(model, DataLoader(data(), batch_size=8))
    assert torch.equal(model.backbone[0].weight, frozen) and not model.backbone[0].weight.requires_grad
    assert len(t.optimizers[0].param_groups) == 1
    optimizer = torch.optim.SGD(model.head.parameters(), lr=1.0)
    BaseFinetuning.unfreeze_and_add_param_group(model.backbone[0], optimizer)
    assert model.backbone[0].weight.requires_grad
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)  # the first group's lr / initial_denom_lr
    BaseFinetuning.unfreeze_and_add_param_group(model.backbone[0], optimizer)  # already held: skipped
    assert len(optimizer.param_groups) == 2


def test_backbone_finetuning_needs_a_backbone(tmp_path: Any) -> None:
    class NoBackbone(TwoOptimizers):
        backbone = None

    with pytest.raises(MisconfigurationError, match="backbone"):
        trainer(tmp_path, [BackboneFinetuning()]).fit(NoBackbone(), DataLoader(data(), batch_size=8))


def test_finetuning_resumes_exactly_from_any_step(tmp_path: Any) -> None:
    """Checkpoints before the unfreeze, in the unfreeze epoch's middle and at a later epoch's start:
    each resume ends bitwise equal to the uninterrupted run (Lightning's leaves the backbone frozen)."""

    def callbacks() -> list:
        return [BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.5)]

    model = Regressor()
    every_step = ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")
    trainer(tmp_path, [*callbacks(), every_step], max_epochs=3).fit(model, DataLoader(data(), batch_size=8))
    expected = weights(model)
    for step in (2, 6, 9):  # epoch 0; epoch 1 mid-way (unfrozen); epoch 2 mid-way (its lr raised)
        resumed = Regressor()
        trainer(tmp_path / str(step), callbacks(), max_epochs=3).fit(
            resumed, DataLoader(data(), batch_size=8), ckpt_path=str(tmp_path / "ck" / f"step={step}.ckpt"))
        got = weights(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected), f"resumed at step {step}"


# ------------------------------------------------------------ Timer
def test_timer_rejects_a_bad_duration() -> None:
    with pytest.raises(MisconfigurationError, match="DD:HH:MM:SS"):
        Timer(duration="1:30")
    with pytest.raises(MisconfigurationError, match="interval"):
        Timer(duration="00:00:01:00", interval="batch")
    assert Timer(duration={"minutes": 2}).time_remaining() == 120.0


def test_trainer_max_time_is_a_step_timer_unless_one_is_given(tmp_path: Any, caplog: Any) -> None:
    timers = [cb for cb in Trainer(max_time={"minutes": 2}, default_root_dir=tmp_path).callbacks
              if isinstance(cb, Timer)]
    assert len(timers) == 1 and timers[0].time_remaining() == 120.0
    mine = Timer(duration="00:00:05:00")
    t = Trainer(max_time="00:00:01:00", callbacks=[mine], default_root_dir=tmp_path)
    assert "Ignoring `Trainer(max_time=...)`" in caplog.text
    assert [cb for cb in t.callbacks if isinstance(cb, Timer)] == [mine]


def test_timer_saves_then_stops_and_the_saved_run_resumes_exactly(tmp_path: Any) -> None:
    reference = Regressor()
    trainer(tmp_path / "ref", [], max_epochs=2).fit(reference, DataLoader(data(), batch_size=8))

    model = Regressor(wait_at_step=2, wait_s=1.0)
    timer = Timer(duration=timedelta(seconds=0.5))
    t = trainer(tmp_path, [timer], max_epochs=2)
    t.fit(model, DataLoader(data(), batch_size=8))
    assert t.global_step == 3  # the slow 3rd step spent the budget; the run stopped right after it, mid-epoch
    assert timer.time_elapsed() >= 0.5 and timer.time_remaining() <= 0
    saved = glob.glob(str(tmp_path / "checkpoints" / "timer-step=3.ckpt"))
    assert saved

    again = trainer(tmp_path, [Timer(duration=timedelta(seconds=0.5))], max_epochs=2)
    again.fit(Regressor(), DataLoader(data(), batch_size=8), ckpt_path="last")
    assert again.global_step == 3  # the budget was spent already: nothing more is trained

    resumed = Regressor()
    trainer(tmp_path, [Timer(duration="00:01:00:00")], max_epochs=2).fit(
        resumed, DataLoader(data(), batch_size=8), ckpt_path=saved[0])
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(reference).values()))


# ------------------------------------------------------------ DDP
def _ddp(rank: int, world_size: int, root: str) -> None:
    model = Regressor(wait_at_step=5 if rank == 1 else None, wait_s=1.0)
    start = weights(model.backbone)
    timer = Timer(duration=timedelta(seconds=0.5) if rank == 1 else timedelta(hours=1))  # only rank 1's runs out
    monitor = LearningRateMonitor()
    logger = CSVLogger(root, name="ddp")
    t = trainer(root, [BackboneFinetuning(unfreeze_backbone_at_epoch=1), timer, monitor], logger=logger,
                strategy="ddp", max_epochs=4, log_every_n_steps=2)
    t.fit(model, DataLoader(data(), batch_size=4))  # 4 steps an epoch on each rank
    gathered = t.strategy.gather_object((t.global_step, [p.detach() for p in model.parameters()]))  # buffers are rank 0's only at forward
    if rank == 0:
        (step0, w0), (step1, w1) = gathered
        assert step0 == step1 == 6  # rank 1's budget ran out at step 6; both stopped at the read after it
        assert all(torch.equal(a, b) for a, b in zip(w0, w1)), "unfrozen backbone gradients were not averaged"
        assert not torch.equal(model.backbone[0].weight, start["0.weight"])
        assert os.path.isfile(os.path.join(root, "checkpoints", "timer-step=6.ckpt"))
        # Epoch starts and the logging steps; the first group became /pg1 when the backbone's was added.
        assert monitor.lrs == {"lr-SGD/pg1": [0.1] * 5, "lr-SGD/pg2": [pytest.approx(0.01)] * 2}


@pytest.mark.distributed
def test_finetuning_timer_and_lr_monitor_on_two_ranks(tmp_path: Any) -> None:
    spawn(_ddp, 2, str(tmp_path))
