"""Loop cookbook: K-fold cross-validation.

``KFoldLoop`` is a loop around ``trainer.fit``: ``advance`` is one fold. Each fold trains from
the same initial weights on the other folds' samples, validates on its own, is tested, and
keeps its weights (also in ``ROOT/fold-N.pt``); at the end the folds' models are tested
together, as an ensemble that averages their predictions. ``fit`` starts every fold clean
(progress, logged values, fresh optimizers, a fresh ``EarlyStopping``), so nothing leaks from
one fold into the next: here the first fold stops early, after 2 of 6 epochs, and the second
trains for 5.

The loop's state (``current_fold``, the folds' test metrics and weights, from
``on_save_checkpoint``) is a part of every checkpoint (``trainer.run_state.register``). A
restarted job reads it from the newest checkpoint, so it continues inside the fold it was in,
at the next batch, and does not retrain the folds before.

    python examples/loops/kfold.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/kfold.py [ROOT]
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import distloop
from distloop.checkpoint import load, newest_valid


class KFoldLoop(distloop.Loop):
    """``advance`` = one fold: fit from the initial weights, test, keep the fold's weights."""

    def __init__(self, trainer: distloop.Trainer, module: distloop.LoopModule, data: FoldData) -> None:
        super().__init__()
        self.trainer = trainer
        self.module = module
        self.data = data
        self.current_fold = 0
        self.fold_metrics: list[dict[str, float]] = []
        self.fold_weights: list[dict[str, torch.Tensor]] = []
        self._initial = copy.deepcopy(module)  # before any fit: the initial weights, and the ensemble's template
        self._resume_from: str | None = None
        trainer.run_state.register("kfold", self)

    @property
    def done(self) -> bool:
        return self.current_fold >= self.data.num_folds

    def reset(self) -> None:
        """A restarted job continues the fold its newest checkpoint was written in."""
        self._resume_from, _ = newest_valid(self.trainer.checkpoint_dirs())
        if self._resume_from is not None:
            self.load_state_dict(load(self._resume_from)["kfold"])

    def advance(self) -> None:
        self.data.fold = self.current_fold
        self.module.load_state_dict(self._initial.state_dict())  # a resumed fold's own weights come from its checkpoint
        self.trainer.fit(self.module, datamodule=self.data, ckpt_path=self._resume_from)
        self._resume_from = None
        epochs = self.trainer.current_epoch  # where this fold's own EarlyStopping stopped it
        self.fold_metrics.append({**self.trainer.test(self.module, datamodule=self.data, verbose=False)[0],
                                  "epochs": epochs})
        self.fold_weights.append({k: v.detach().clone() for k, v in self.module.state_dict().items()})
        if self.trainer.is_global_zero:  # the fold's model, for later use (the ensemble uses fold_weights)
            torch.save(self.fold_weights[-1], os.path.join(self.trainer.default_root_dir,
                                                           f"fold-{self.current_fold}.pt"))

    def on_advance_end(self) -> None:
        self.current_fold += 1

    def on_run_end(self) -> dict[str, float]:
        """The ensemble of the folds' models, tested on the test split."""
        members = [copy.deepcopy(self._initial) for _ in self.fold_weights]
        for member, weights in zip(members, self.fold_weights):
            member.load_state_dict(weights)
        return self.trainer.test(Ensemble(members), datamodule=self.data, verbose=False)[0]

    def on_save_checkpoint(self) -> dict[str, Any]:
        return {"current_fold": self.current_fold, "fold_metrics": self.fold_metrics,
                "fold_weights": self.fold_weights}

    def on_load_checkpoint(self, state_dict: dict[str, Any]) -> None:
        self.current_fold = state_dict["current_fold"]
        self.fold_metrics = list(state_dict["fold_metrics"])
        self.fold_weights = list(state_dict["fold_weights"])


class FoldData(distloop.DataModule):
    """``num_folds`` folds of the training samples (a fixed shuffle); ``fold`` is the one held out."""

    def __init__(self, num_folds: int = 3, batch_size: int = 16) -> None:
        super().__init__()
        self.num_folds = num_folds
        self.batch_size = batch_size
        self.fold = 0
        g = torch.Generator().manual_seed(4)
        x = torch.randn(240, 5, generator=g)
        y = (x[:, 0] * x[:, 1] + x[:, 2] > 0).long()
        self.train_set, self.test_set = TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])
        self.order = torch.randperm(192, generator=g).tolist()

    def _held_out(self) -> list[int]:
        return self.order[self.fold::self.num_folds]

    def train_dataloader(self) -> DataLoader:
        held_out = set(self._held_out())
        train = [i for i in self.order if i not in held_out]
        return DataLoader(Subset(self.train_set, train), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Subset(self.train_set, self._held_out()), batch_size=32)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=32)


class Classifier(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(dim=1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=5e-2)


class Ensemble(distloop.LoopModule):
    """The folds' models together: the mean of their probabilities."""

    def __init__(self, members: list[Classifier]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        probs = torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)
        self.log("test_acc", (probs.argmax(dim=1) == y).float().mean(), sync_dist=True)


def main(root: str, callbacks: list[distloop.Callback] = ()) -> dict[str, Any]:
    """Cross-validate (continuing from ``root``'s newest checkpoint, if any); returns every fold's
    test accuracy and weights, and the ensemble's accuracy."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = distloop.Trainer(
        max_epochs=6, default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=2,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[distloop.EarlyStopping("val_loss", patience=1), *callbacks,
                   distloop.ModelCheckpoint(every_n_train_steps=3, save_last=True)])
    kfold = KFoldLoop(trainer, Classifier(), FoldData(num_folds=3, batch_size=16 // world_size))
    ensemble = kfold.run()
    return {"fold_test_acc": [torch.tensor(m["test_acc"]) for m in kfold.fold_metrics],
            "fold_epochs": [m["epochs"] for m in kfold.fold_metrics],
            "fold_weights": kfold.fold_weights, "ensemble_test_acc": torch.tensor(ensemble["test_acc"])}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/kfold")
    folds = ", ".join(f"{acc:.3f}" for acc in result["fold_test_acc"])
    print(f"test accuracy per fold: {folds} (epochs {result['fold_epochs']}); "
          f"ensemble: {result['ensemble_test_acc']:.3f}")
