"""Loop cookbook: a validation-guided update.

Between a batch's backward and its optimizer step, the epoch loop runs a small validation
pass (the first ``guide_batches`` batches of the validation data, through the epoch loop's own
``val_loop``, so ``validation_step`` and the validation hooks run as usual and the loss is
synced over the ranks). When the validation loss is higher than at the previous step, the
step's learning rate is halved before the update. The learning rate lives in the optimizer
and the previous loss in the loop's ``on_save_checkpoint``, so a resumed run takes the same
steps.

    python examples/loops/validation_guided.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/validation_guided.py [ROOT]
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop
from distloop.loops import TrainingEpochLoop


class ValidationGuidedEpochLoop(TrainingEpochLoop):
    """Each batch: forward and backward, a small validation pass, maybe a smaller learning rate, the step."""

    def __init__(self, guide_batches: int = 1, min_lr: float = 1e-4) -> None:
        super().__init__()
        self.guide_batches = guide_batches
        self.min_lr = min_lr
        self.previous_val_loss = math.inf

    def advance(self, dataloader: Any) -> None:
        trainer, progress, optimization = self.trainer, self.batch_progress, self.optimization
        batch, batch_idx = self.fetch_batch()
        if trainer.hooks("on_train_batch_start", batch, batch_idx) == -1:
            raise StopIteration
        progress.increment_started()
        outputs = optimization.forward_backward(trainer, batch, batch_idx)
        self.guide(trainer.optimizers[0])
        optimization.step(trainer)
        progress.increment_processed()
        if progress.is_last_batch and trainer.lr_scheduler_configs:
            self.step_epoch_schedulers()
        trainer.hooks("on_train_batch_end", outputs, batch, batch_idx)
        progress.increment_completed()
        if progress.total.completed % trainer.log_every_n_steps == 0:
            trainer.read_metrics(self.results, on_step=True)

    def guide(self, optimizer: torch.optim.Optimizer) -> None:
        """Halve the learning rate when a small validation pass got worse since the last step."""
        trainer = self.trainer
        limits = [min(self.guide_batches, n) for n in trainer.num_val_batches]
        val_loss = float(self.val_loop.run(trainer.val_dataloaders, limits)[0]["val_loss"])
        if val_loss > self.previous_val_loss:
            for group in optimizer.param_groups:
                group["lr"] = max(group["lr"] / 2, self.min_lr)
        self.previous_val_loss = val_loss

    def on_save_checkpoint(self) -> dict:
        return {**super().on_save_checkpoint(), "previous_val_loss": self.previous_val_loss}

    def on_load_checkpoint(self, state_dict: dict) -> None:
        super().on_load_checkpoint(state_dict)
        self.previous_val_loss = state_dict["previous_val_loss"]


class Regressor(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def datasets(n: int = 160) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(n, 6, generator=g)
    y = torch.tanh(x[:, :2]).sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x[:128], y[:128]), TensorDataset(x[128:], y[128:])


def main(root: str, callbacks: list[distloop.Callback] = ()) -> dict[str, Any]:
    """Fit (resuming from ``root``'s last checkpoint, if any); returns the weights and learning rate."""
    trainer = distloop.Trainer(
        max_epochs=3, default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=2,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[*callbacks, distloop.ModelCheckpoint(every_n_train_steps=3, save_last=True)])
    trainer.fit_loop.replace(epoch_loop=ValidationGuidedEpochLoop(guide_batches=1))
    module = Regressor()
    train, val = datasets()
    batch_size = 16 // trainer.world_size  # the same global batches on one process and on two
    trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size),
                ckpt_path="last")
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()},
            "lr": torch.tensor(trainer.optimizers[0].param_groups[0]["lr"]),
            "val_loss": trainer.callback_metrics["val_loss"].clone()}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/validation_guided")
    print(f"final lr={result['lr']:.4f} val_loss={result['val_loss']:.4f}")
