"""A model, data and callbacks for the exact-resume tests (imported by spawned ranks too)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distloop import Callback, LoopModule, ModelCheckpoint, Trainer
from distloop.loggers import Logger


def dataset(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(torch.arange(n), x, (x.sum(dim=1) > 0).long())


class Net(LoopModule):
    """Dropout and shuffling make the random streams matter; every batch's sample ids are recorded."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
        self.seen: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, x, y = batch
        self.seen.append((self.trainer.current_epoch, batch_idx, ids.tolist()))
        loss = F.cross_entropy(self.net(x), y)
        self.log("loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        self.log("noise", torch.rand(()), on_epoch=True, reduce_fx="max", sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 4),
                                                   "interval": "step"}}


class CrashAt(Callback):
    """Raises after optimizer step ``step`` (a crash in the middle of an epoch)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


class Recording(Logger):
    """Keeps what the trainer logged, in memory."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def log_dir(self) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        pass


def make_trainer(root: str, *callbacks: Callback, every: int = 2, **kwargs: Any) -> Trainer:
    kwargs = {"max_epochs": 3, "seed": 3, "deterministic": True, "enable_progress_bar": False,
              "accumulate_grad_batches": 2, "val_check_interval": 0.5, "log_every_n_steps": 3,
              "accelerator": "cpu", **kwargs}
    checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=every, save_top_k=-1)
    return Trainer(default_root_dir=root, callbacks=[checkpoint, *callbacks], logger=Recording(), **kwargs)


def loaders(batch_size: int = 4, num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(dataset(), batch_size=batch_size, shuffle=True, num_workers=num_workers),
            DataLoader(dataset(), batch_size=16, num_workers=num_workers))


def fit(root: str, *callbacks: Callback, ckpt_path: str | None = None, num_workers: int = 0,
        **kwargs: Any) -> tuple[Trainer, Net]:
    """Fit ``Net`` from scratch or ``ckpt_path``; a crash leaves the trainer as it was."""
    trainer, module = make_trainer(root, *callbacks, **kwargs), Net()
    try:
        trainer.fit(module, *loaders(num_workers=num_workers), ckpt_path=ckpt_path)
    except RuntimeError as err:
        if "crash at step" not in str(err):
            raise
    return trainer, module


def epoch_rows(trainer: Trainer) -> dict[int, dict[str, float]]:
    """Logged epoch-level values by step (what a resumed run must reproduce)."""
    out: dict[int, dict[str, float]] = {}
    for step, row in trainer.loggers[0].rows:
        epoch_values = {k: v for k, v in row.items() if k.endswith("_epoch") or k.startswith("val_")}
        if epoch_values:
            out.setdefault(step, {}).update(epoch_values)
    return out


def merged_seen(*modules: Net) -> list[list[int]]:
    """Batches seen across interrupted runs: a later run's record of a batch replaces an earlier one's."""
    by_position: dict[tuple[int, int], list[int]] = {}
    for module in modules:
        for epoch, batch_idx, ids in module.seen:
            by_position[(epoch, batch_idx)] = ids
    return [by_position[k] for k in sorted(by_position)]
