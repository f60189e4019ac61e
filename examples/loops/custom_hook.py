"""Loop cookbook: your own hook.

A loop can call a hook the Trainer does not know: ``trainer.hooks(name, *args)`` calls it on
every callback that defines it, then on the module (Lightning's order), and returns the
module's answer; nobody defining it costs one set lookup. Here the epoch loop calls
``on_train_batch_ready(batch, batch_idx)`` after each batch reaches the device and before
``training_step``: the module turns it into a curriculum (the number of input features it
sees grows with the epoch), and a callback counts the samples trained on, with its count in
the checkpoint so that a resumed run counts exactly.

    python examples/loops/custom_hook.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/custom_hook.py [ROOT]
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop
from distloop.loops import TrainingEpochLoop


class HookedEpochLoop(TrainingEpochLoop):
    """Calls ``on_train_batch_ready`` on each fetched batch; a module that returns a batch replaces it."""

    def fetch_batch(self) -> tuple[Any, int]:
        batch, batch_idx = super().fetch_batch()
        replaced = self.trainer.hooks("on_train_batch_ready", batch, batch_idx)
        return (batch if replaced is None else replaced), batch_idx


class SampleCounter(distloop.Callback):
    """Samples trained on, over every rank (reduced once, at the end of training)."""

    def __init__(self) -> None:
        self.samples = 0  # this rank's
        self.total: int | None = None

    def on_train_batch_ready(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.samples += len(batch[0])

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.total = int(trainer.strategy.reduce(torch.tensor(float(self.samples)), "sum"))

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples = state_dict["samples"]


class Curriculum(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))

    def on_train_batch_ready(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        seen = min(8, 2 * (self.current_epoch + 1))  # 2 features in epoch 0, 4 in epoch 1, ...
        return x * (torch.arange(8, device=x.device) < seen), y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def dataset(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def main(root: str, callbacks: list[distloop.Callback] = (), max_epochs: int = 4) -> dict[str, Any]:
    """Fit (resuming from ``root``'s last checkpoint, if any); returns the weights, loss and sample count."""
    counter = SampleCounter()
    trainer = distloop.Trainer(
        max_epochs=max_epochs, default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=2,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[counter, distloop.ModelCheckpoint(every_n_train_steps=3, save_last=True), *callbacks])
    trainer.fit_loop.replace(epoch_loop=HookedEpochLoop)
    module = Curriculum()
    # Batches of 16 on one process, 8 per rank on two: the same steps, the same global batches.
    batch_size = 16 // trainer.world_size
    trainer.fit(module, DataLoader(dataset(), batch_size=batch_size), ckpt_path="last")
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()},
            "loss": trainer.callback_metrics["train_loss_epoch"].clone(), "samples": counter.total}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/custom_hook")
    print(f"samples={result['samples']} train_loss={result['loss']:.6f}")
