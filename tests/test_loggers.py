"""CSV and TensorBoard loggers as a Lightning user sees them: where they write, what, and with which version."""

import csv
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import LoopModule, Trainer
from distloop.loggers import CSVLogger, TensorBoardLogger, agree_on_versions
from distloop.loggers.csv import ExperimentWriter


class Regressor(LoopModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(logger, root, max_epochs=2):
    trainer = Trainer(max_epochs=max_epochs, logger=logger, default_root_dir=str(root), log_every_n_steps=2,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu")
    trainer.fit(Regressor(), loader(), loader())
    return trainer


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_runs_write_two_versions(tmp_path):
    first, second = CSVLogger(tmp_path), CSVLogger(tmp_path)
    fit(first, tmp_path)
    fit(second, tmp_path, max_epochs=1)
    assert (first.version, second.version) == (0, 1)
    root = tmp_path / "lightning_logs"
    assert first.log_dir == str(root / "version_0") and second.log_dir == str(root / "version_1")
    assert first.root_dir == str(root) and first.save_dir == str(tmp_path) and first.name == "lightning_logs"
    a, b = rows(root / "version_0" / "metrics.csv"), rows(root / "version_1" / "metrics.csv")
    assert list(a[0]) == ["epoch", "step", "train_loss", "val_loss"]  # every key, sorted
    assert max(int(r["epoch"]) for r in a) == 1 and max(int(r["epoch"]) for r in b) == 0
    assert len([r for r in b if r["val_loss"]]) == 1 and len([r for r in b if r["train_loss"]]) == 2  # every 2 of 4


@pytest.mark.parametrize(("name", "version", "folder"), [
    ("exp", None, "exp/version_0"), (None, None, "version_0"), ("", 3, "version_3"), ("exp", "run-a", "exp/run-a"),
])
def test_name_and_version_make_the_folder(tmp_path, name, version, folder):
    for cls in (CSVLogger, TensorBoardLogger):
        logger = cls(tmp_path / cls.__name__, name=name, version=version)
        assert logger.log_dir == os.path.join(tmp_path, cls.__name__, folder)


def test_the_next_version_follows_the_highest(tmp_path):
    for existing in ("version_0", "version_3", "version_x", "other"):
        (tmp_path / "lightning_logs" / existing).mkdir(parents=True)
    assert CSVLogger(tmp_path).version == 4 and TensorBoardLogger(tmp_path).version == 4


def test_hyperparameters_go_to_hparams_yaml(tmp_path):
    logger = CSVLogger(tmp_path, version="run")
    logger.log_hyperparams({"lr": 0.1, "model": {"hidden": 8}})
    logger.log_hyperparams({"batch_size": 4})
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "run" / "hparams.yaml").read_text())
    assert saved == {"lr": 0.1, "model": {"hidden": 8}, "batch_size": 4}


def test_prefix_and_flushing(tmp_path):
    logger = CSVLogger(tmp_path, prefix="train", flush_logs_every_n_steps=2)
    assert isinstance(logger.experiment, ExperimentWriter)
    path = logger.experiment.metrics_file_path
    logger.log_metrics({"loss": torch.tensor(0.5)}, step=0)
    assert not os.path.exists(path)  # buffered until step 1, the 2nd
    logger.log_metrics({"loss": 0.25}, step=1)
    logger.log_metrics({"loss": 0.125, "acc": 1.0}, step=2)
    assert rows(path) == [{"step": "0", "train-loss": "0.5"}, {"step": "1", "train-loss": "0.25"}]
    logger.finalize("success")
    assert rows(path)[2] == {"step": "2", "train-acc": "1.0", "train-loss": "0.125"}
    assert list(rows(path)[0]) == ["step", "train-acc", "train-loss"]  # rewritten with the wider header


def test_the_default_logger_writes_lightning_logs_versions(tmp_path):
    first = fit(True, tmp_path, max_epochs=1)
    second = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False)
    assert first.log_dir == str(tmp_path / "lightning_logs" / "version_0")
    assert second.log_dir == str(tmp_path / "lightning_logs" / "version_1")
    assert rows(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")


def test_tensorboard_writes_events_and_hparams(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logger = TensorBoardLogger(tmp_path, sub_dir="train")
    logger.log_hyperparams({"lr": 0.1, "layers": [1, 2]})
    fit(logger, tmp_path, max_epochs=1)
    assert isinstance(logger.experiment, SummaryWriter)
    log_dir = tmp_path / "lightning_logs" / "version_0" / "train"
    assert logger.log_dir == str(log_dir)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(log_dir))
    assert yaml.safe_load((log_dir / "hparams.yaml").read_text()) == {"lr": 0.1, "layers": [1, 2]}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"hp_metric", "train_loss", "val_loss", "epoch"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("hp_metric")] == [-1]


def _versions_agree(rank, world_size, root, out):
    class Gloo:  # the strategy's side of the collective
        is_global_zero = rank == 0

        def __init__(self):
            self.world_size = world_size

        def broadcast(self, obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

    logger = CSVLogger(root)
    if rank == 0:
        assert logger.version == 0
    dist.barrier()
    if rank == 1:  # rank 0 has started writing: rank 1 looking for itself would take the next version
        os.makedirs(os.path.join(root, "lightning_logs", "version_0"))
        alone = CSVLogger(root).version
    agree_on_versions([logger], Gloo())
    torch.save({"log_dir": logger.log_dir, "alone": alone if rank == 1 else None}, f"{out}-{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_every_rank_takes_rank_zeros_version(tmp_path):
    root = str(tmp_path / "logs")
    spawn(_versions_agree, 2, root, str(tmp_path / "r"))
    zero, one = (torch.load(tmp_path / f"r-{rank}.pt", weights_only=True) for rank in range(2))
    assert zero["log_dir"] == one["log_dir"] == os.path.join(root, "lightning_logs", "version_0")
    assert one["alone"] == 1
