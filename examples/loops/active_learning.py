"""Loop cookbook: active learning.

``ActiveLearningLoop`` is a loop around ``trainer.fit`` and ``trainer.predict``: ``advance`` is
one round. It trains from the initial weights on the labelled pool, predicts on the
unlabelled pool, and moves the ``query_size`` samples the model is least sure of (the highest
entropy) into the labelled pool. Under DDP each rank predicts its shard of the pool; the
module gathers the scores from every rank, so all ranks choose the same samples.

The pools and the round are a part of every checkpoint (``trainer.run_state.register``): a
restarted job reads them from the newest checkpoint and continues the round it was in, at the
next batch of that round's fit.

    python examples/loops/active_learning.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/active_learning.py [ROOT]
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


class ActiveLearningLoop(distloop.Loop):
    """``advance`` = one round: fit on ``labelled``, score ``unlabelled``, move the most uncertain."""

    def __init__(self, trainer: distloop.Trainer, module: Learner, data: WithIds, labelled: list[int],
                 rounds: int, query_size: int, batch_size: int) -> None:
        super().__init__()
        self.trainer = trainer
        self.module = module
        self.data = data
        self.rounds, self.query_size, self.batch_size = rounds, query_size, batch_size
        self.round = 0
        self.labelled = list(labelled)
        self.unlabelled = [i for i in range(len(data)) if i not in set(labelled)]
        self._initial = copy.deepcopy(module.state_dict())
        self._resume_from: str | None = None
        trainer.run_state.register("active_learning", self)

    @property
    def done(self) -> bool:
        return self.round >= self.rounds

    def reset(self) -> None:
        """A restarted job continues the round its newest checkpoint was written in."""
        self._resume_from, _ = newest_valid(self.trainer.checkpoint_dirs())
        if self._resume_from is not None:
            self.load_state_dict(load(self._resume_from)["active_learning"])

    def advance(self) -> None:
        trainer, module = self.trainer, self.module
        module.load_state_dict(self._initial)  # every round starts from the same weights
        trainer.fit(module, DataLoader(Subset(self.data, self.labelled), batch_size=self.batch_size, shuffle=True),
                    ckpt_path=self._resume_from)
        self._resume_from = None
        pool = DataLoader(Subset(self.data, self.unlabelled), batch_size=32)
        trainer.predict(module, pool, return_predictions=False)
        ranked = sorted(module.uncertainty.items(), key=lambda kv: (-kv[1], kv[0]))  # ties: by sample id
        chosen = [sample for sample, _ in ranked[:self.query_size]]
        self.labelled += chosen
        self.unlabelled = [i for i in self.unlabelled if i not in set(chosen)]

    def on_advance_end(self) -> None:
        self.round += 1

    def on_save_checkpoint(self) -> dict[str, Any]:
        return {"round": self.round, "labelled": self.labelled, "unlabelled": self.unlabelled}

    def on_load_checkpoint(self, state_dict: dict[str, Any]) -> None:
        self.round = state_dict["round"]
        self.labelled = list(state_dict["labelled"])
        self.unlabelled = list(state_dict["unlabelled"])


class Learner(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
        self.uncertainty: dict[int, float] = {}  # sample id -> entropy, of every rank's shard
        self._scores: list[torch.Tensor] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        _, x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, sync_dist=True)
        return loss

    def on_predict_start(self) -> None:
        self._scores = []

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        ids, x, _ = batch
        probs = self.net(x).softmax(dim=1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
        self._scores.append(torch.stack([ids.double(), entropy.double()], dim=1))

    def on_predict_end(self) -> None:
        gathered = self.all_gather(torch.cat(self._scores))  # (ranks, n, 2) under DDP, (n, 2) alone
        self.uncertainty = {int(i): float(e) for i, e in gathered.reshape(-1, 2).tolist()}

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class WithIds(TensorDataset):
    """Each sample carries its id (its index here), so a prediction names the sample it is for."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return (torch.tensor(index), *super().__getitem__(index))


def main(root: str, callbacks: list[distloop.Callback] = ()) -> dict[str, Any]:
    """Three rounds (continuing from ``root``'s newest checkpoint, if any); returns the pools and weights."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(192, 4, generator=g)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    trainer = distloop.Trainer(
        max_epochs=3, default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=2,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[*callbacks, distloop.ModelCheckpoint(every_n_train_steps=2, save_last=True)])
    module = Learner()
    loop = ActiveLearningLoop(trainer, module, WithIds(x, labels), labelled=list(range(32)), rounds=3,
                              query_size=16, batch_size=16 // world_size)
    loop.run()
    return {"labelled": loop.labelled, "unlabelled": loop.unlabelled,
            "weights": {k: v.clone() for k, v in module.state_dict().items()}}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/active_learning")
    print(f"labelled pool: {len(result['labelled'])} samples; the last queried: {result['labelled'][-16:]}")
