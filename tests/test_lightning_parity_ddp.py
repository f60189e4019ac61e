"""Lightning's everyday API on 2 gloo ranks: prepare_data, several validation loaders, synced step values."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import Callback, DataModule, LoopModule, ModelCheckpoint, Trainer

pytestmark = pytest.mark.distributed


def numbered(n: int) -> TensorDataset:
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, 2 * x)


class Model(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(1, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x / 10), y / 10)
        self.log("rank_value", float(self.global_rank), sync_dist=True)  # a step value, synced
        self.log("local_value", float(self.global_rank))  # a step value, rank-local
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, _ = batch
        self.log("seen", float(len(x)), reduce_fx="sum", sync_dist=True)
        self.log("ids", x.sum(), reduce_fx="sum", sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Data(DataModule):
    def __init__(self, marker_dir: str, per_node: bool) -> None:
        super().__init__()
        self.marker_dir = marker_dir
        self.prepare_data_per_node = per_node

    def prepare_data(self) -> None:
        with open(os.path.join(self.marker_dir, f"prepared-by-{os.environ['RANK']}"), "w"):
            pass

    def setup(self, stage: str) -> None:
        assert os.listdir(self.marker_dir), "setup ran before prepare_data finished"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(numbered(16), batch_size=4, shuffle=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(numbered(10), batch_size=2), DataLoader(numbered(6), batch_size=3)]


class AtEpochEnd(Callback):
    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _run(rank: int, world_size: int, root: str, per_node: bool) -> None:
    marker_dir = os.path.join(root, f"markers-{per_node}")
    os.makedirs(marker_dir, exist_ok=True)
    seen = AtEpochEnd()
    best = ModelCheckpoint(dirpath=os.path.join(root, f"ck-{per_node}"), monitor="rank_value", every_n_train_steps=1)
    trainer = Trainer(strategy="ddp", accelerator="cpu", max_epochs=1, default_root_dir=root, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[seen, best],
                      num_sanity_val_steps=0, log_every_n_steps=50)
    trainer.fit(Model(), Data(marker_dir, per_node))
    assert sorted(os.listdir(marker_dir)) == ["prepared-by-0"]  # one node: global and local rank zero alike
    # Each validation loader is sharded: every sample once over the ranks (10 and 6 samples, ids summed).
    m = seen.metrics
    assert m["seen/dataloader_idx_0"] == 10 and m["seen/dataloader_idx_1"] == 6
    assert m["ids/dataloader_idx_0"] == sum(range(10)) and m["ids/dataloader_idx_1"] == sum(range(6))
    assert trainer.num_val_batches == [3, 1]  # per rank: 5 samples in batches of 2, 3 in one batch of 3
    # The last step's synced value is the mean over ranks at the epoch end; the rank-local one is this rank's.
    assert m["rank_value"] == 0.5 and m["local_value"] == float(rank)
    # A checkpoint monitoring a synced step value reads it synced at its own steps, and every rank
    # knows the best file (code like `trainer.test(ckpt_path=best.best_model_path)` runs on every rank).
    assert float(best.best_model_score) == 0.5
    assert os.path.basename(best.best_model_path).startswith("epoch=0-step=") and os.path.exists(best.best_model_path)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("per_node", [True, False])
def test_prepare_data_several_loaders_and_synced_step_values(tmp_path: Any, per_node: bool) -> None:
    spawn(_run, 2, str(tmp_path), per_node, init=False, timeout=150)
