"""Loop cookbook: alternating multi-task epochs.

Every ``every``-th epoch trains on a second task's dataloader instead of the main one, and
validation runs only after main-task epochs. The fit loop chooses the epoch's loader; the
second loader is prepared with ``trainer.prepare_dataloader``, as ``fit`` prepares the main
one, so it is sharded over the ranks and resumes mid-epoch at the next sample. The epoch
loop's ``should_validate`` skips validation in the second task's epochs.

    python examples/loops/alternating_tasks.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/alternating_tasks.py [ROOT]
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop
from distloop.loops import FitLoop, TrainingEpochLoop


class AlternatingFitLoop(FitLoop):
    """Epochs ``every - 1``, ``2 * every - 1``, ... train on ``aux_loader``; the others on fit's loader."""

    def __init__(self, aux_loader: Iterable, every: int, max_epochs: int) -> None:
        super().__init__(max_epochs=max_epochs)
        self.aux_loader = aux_loader
        self.every = every
        self.epoch_loop = MainTaskValidation()
        self._aux: Iterable | None = None

    @property
    def aux_epoch(self) -> bool:
        """Whether the current epoch trains the second task."""
        return (self.trainer.current_epoch + 1) % self.every == 0

    def on_run_start(self) -> None:
        self._aux = self.trainer.prepare_dataloader(self.aux_loader)
        super().on_run_start()

    def advance(self) -> None:
        self.epoch_loop.run(self._aux if self.aux_epoch else self.trainer.train_dataloader)


class MainTaskValidation(TrainingEpochLoop):
    def should_validate(self) -> bool:
        return not self.trainer.fit_loop.aux_epoch and super().should_validate()


class ValidationEpochs(distloop.Callback):
    """The epochs after which validation ran (in the checkpoint, so a resumed run's list is whole)."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking:
            self.epochs.append(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict["epochs"])


class TwoTasks(distloop.LoopModule):
    """A shared trunk, a regression head (main task) and a sign-classification head (second task)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, 32), nn.ReLU())
        self.regress = nn.Linear(32, 1)
        self.classify = nn.Linear(32, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.trainer.fit_loop.aux_epoch:
            loss = F.cross_entropy(self.classify(self.trunk(x)), y)
            self.log("aux_loss", loss, on_epoch=True, sync_dist=True)
        else:
            loss = F.mse_loss(self.regress(self.trunk(x)), y)
            self.log("main_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.regress(self.trunk(x)), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=5e-3)


def datasets(n: int = 128) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(n, 6, generator=g)
    main_task = TensorDataset(x, x[:, :3].sum(dim=1, keepdim=True))
    second_task = TensorDataset(x, (x[:, 3:].sum(dim=1) > 0).long())
    return main_task, second_task


def main(root: str, callbacks: list[distloop.Callback] = ()) -> dict[str, Any]:
    """Fit (resuming from ``root``'s last checkpoint, if any); returns weights, losses, validation epochs."""
    validations = ValidationEpochs()
    trainer = distloop.Trainer(
        strategy="ddp_find_unused_parameters_true",  # each task leaves the other's head without gradients
        default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=2, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[validations, distloop.ModelCheckpoint(every_n_train_steps=3, save_last=True), *callbacks])
    main_task, second_task = datasets()
    batch_size = 16 // trainer.world_size  # the same global batches on one process and on two
    trainer.fit_loop = AlternatingFitLoop(DataLoader(second_task, batch_size=batch_size, shuffle=True),
                                          every=3, max_epochs=6)
    module = TwoTasks()
    trainer.fit(module, DataLoader(main_task, batch_size=batch_size, shuffle=True),
                DataLoader(main_task, batch_size=32), ckpt_path="last")
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()},
            "val_loss": trainer.callback_metrics["val_loss"].clone(),
            "aux_loss": trainer.callback_metrics["aux_loss_epoch"].clone(), "validated": validations.epochs}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/alternating_tasks")
    print(f"validated after epochs {result['validated']}; val_loss={result['val_loss']:.4f}")
