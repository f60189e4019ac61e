"""Lightning 2.x code, renamed to distloop, behaves as in Lightning: the Trainer's everyday API.

Each test is written the way a Lightning user writes it (a module, maybe a datamodule, a
``Trainer(...)`` call) and asserts Lightning's documented result.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from distloop import Callback, DataModule, EarlyStopping, LoopModule, ModelCheckpoint, Trainer, seed_everything
from distloop.errors import MisconfigurationError


def regression(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))


class Regressor(LoopModule):
    """Lightning's usual shape: ``training_step`` logs ``train_loss``, ``validation_step`` logs ``val_loss``."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RegressionData(DataModule):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}:{self.trainer is not None}")
        self.train, self.val, self.test_set = regression(64, 0), regression(32, 1), regression(16, 2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=8, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=8)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=8)


def quiet(tmp_path: Any, **kwargs: Any) -> Trainer:
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("logger", False)
    return Trainer(default_root_dir=tmp_path, accelerator="cpu", **kwargs)


# ---------------------------------------------------------------- fit / validate / test signatures
def test_datamodule_positionally_and_model_keyword(tmp_path: Any) -> None:
    dm = RegressionData()
    trainer = quiet(tmp_path, max_epochs=1)
    trainer.fit(model=Regressor(), train_dataloaders=dm)
    assert trainer.global_step == 8
    assert trainer.datamodule is dm and dm.calls[:2] == ["prepare_data", "setup:fit:True"]
    model = Regressor()
    trainer.fit(model, dm)
    (val,) = trainer.validate(model, dm)
    (test,) = trainer.test(model, dm)
    assert set(val) == {"val_loss"} and set(test) == {"test_loss"}
    assert "setup:validate:True" in dm.calls and "setup:test:True" in dm.calls


def test_dataloaders_defined_on_the_module(tmp_path: Any) -> None:
    class WithData(Regressor):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(regression(32), batch_size=8)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(regression(16, 1), batch_size=8)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(regression(16, 2), batch_size=4)

    trainer = quiet(tmp_path, max_epochs=2)
    model = WithData()
    trainer.fit(model)
    assert trainer.global_step == 8 and "val_loss" in trainer.callback_metrics
    (out,) = trainer.test(model)
    assert trainer.num_test_batches == [4] and "test_loss" in out


def test_steps_without_batch_idx(tmp_path: Any) -> None:
    class NoIndex(Regressor):
        def training_step(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self(x), y)

        def validation_step(self, batch: Any) -> None:
            x, y = batch
            self.log("val_loss", F.mse_loss(self(x), y))

        def predict_step(self, batch: Any) -> torch.Tensor:
            return self(batch[0])

    trainer = quiet(tmp_path, max_epochs=1)
    model = NoIndex()
    trainer.fit(model, DataLoader(regression(16), batch_size=8), DataLoader(regression(8), batch_size=8))
    assert trainer.global_step == 2 and "val_loss" in trainer.callback_metrics
    predictions = trainer.predict(model, DataLoader(regression(8), batch_size=4))
    assert len(predictions) == 2 and predictions[0].shape == (4, 1)


# ---------------------------------------------------------------- prepare_data
def test_prepare_data_runs_before_setup_once(tmp_path: Any) -> None:
    dm = RegressionData()
    quiet(tmp_path, max_epochs=1).fit(Regressor(), datamodule=dm)
    assert dm.calls.count("prepare_data") == 1 and dm.calls.index("prepare_data") < dm.calls.index("setup:fit:True")


# ---------------------------------------------------------------- arguments that meant something else
def test_limit_train_batches_one_means_one_batch(tmp_path: Any) -> None:
    trainer = quiet(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(Regressor(), DataLoader(regression(64), batch_size=8), DataLoader(regression(16), batch_size=8))
    assert trainer.global_step == 3
    assert trainer.num_training_batches == 1 and trainer.num_val_batches == [1]


def test_global_step_survives_test(tmp_path: Any) -> None:
    dm = RegressionData()
    trainer = quiet(tmp_path, max_epochs=2)
    model = Regressor()
    trainer.fit(model, dm)
    trainer.test(model, dm)
    assert trainer.global_step == 16 and trainer.current_epoch == 2


def test_estimated_stepping_batches_for_one_cycle(tmp_path: Any) -> None:
    class OneCycle(Regressor):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.01)
            total = self.trainer.estimated_stepping_batches
            self.total = total
            return {"optimizer": opt, "lr_scheduler": {
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total),
                "interval": "step"}}

    model = OneCycle()
    trainer = quiet(tmp_path, max_epochs=3, accumulate_grad_batches=2)
    trainer.fit(model, DataLoader(regression(80), batch_size=8))  # 10 batches, 5 steps per epoch
    assert model.total == 15 and trainer.global_step == 15


# ---------------------------------------------------------------- step values reach callbacks after every batch
class SeeStepValues(Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(float(trainer.callback_metrics["train_loss"]))


def test_step_value_is_in_callback_metrics_after_every_batch(tmp_path: Any) -> None:
    seen = SeeStepValues()
    losses: list[float] = []

    class Recorded(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            losses.append(float(loss))
            return loss

    trainer = quiet(tmp_path, max_epochs=2, callbacks=[seen], log_every_n_steps=50)
    trainer.fit(Recorded(), DataLoader(regression(32), batch_size=8))
    assert seen.seen == pytest.approx(losses) and len(losses) == 8


def test_step_and_epoch_values_after_fit(tmp_path: Any) -> None:
    class Both(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.mse_loss(self(x), y)
            self.log("loss", loss, on_step=True, on_epoch=True)
            return loss

    trainer = quiet(tmp_path, max_epochs=1)
    trainer.fit(Both(), DataLoader(regression(24), batch_size=8))
    assert {"loss", "loss_step", "loss_epoch"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics["loss"]) == float(trainer.callback_metrics["loss_epoch"])


def test_early_stopping_on_a_step_value(tmp_path: Any) -> None:
    stopper = EarlyStopping(monitor="train_loss", patience=1, mode="max", check_on_train_epoch_end=True)
    trainer = quiet(tmp_path, max_epochs=10, callbacks=[stopper])
    trainer.fit(Regressor(lr=0.01), DataLoader(regression(32), batch_size=8))  # the loss falls: "max" stops it
    assert trainer.current_epoch == 2 and stopper.stopped_epoch == 1


# ---------------------------------------------------------------- default callbacks
def test_default_checkpoint_and_callback_attributes(tmp_path: Any) -> None:
    stopper = EarlyStopping(monitor="val_loss")
    trainer = quiet(tmp_path, max_epochs=2, callbacks=[stopper])
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint)
    assert trainer.checkpoint_callbacks == [trainer.checkpoint_callback]
    assert trainer.early_stopping_callback is stopper
    trainer.fit(Regressor(), RegressionData())
    assert os.listdir(tmp_path / "checkpoints") == ["epoch=1-step=16.ckpt"]
    assert trainer.checkpoint_callback.best_model_path == str(tmp_path / "checkpoints" / "epoch=1-step=16.ckpt")
    off = quiet(tmp_path / "off", max_epochs=1, enable_checkpointing=False)
    assert off.checkpoint_callback is None
    off.fit(Regressor(), RegressionData())
    assert not (tmp_path / "off" / "checkpoints").exists()


def test_checkpoint_callbacks_and_deepcopy(tmp_path: Any) -> None:
    trainer = quiet(tmp_path, enable_progress_bar=True, callbacks=[EarlyStopping(monitor="val_loss")])
    copies = copy.deepcopy(trainer.callbacks)
    assert [type(c).__name__ for c in copies] == [type(c).__name__ for c in trainer.callbacks]


# ---------------------------------------------------------------- validate / test / predict from checkpoints
class WeightProbe(Regressor):
    """Logs its bias in test_step, so a test shows which weights it ran with."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("bias", self.layer.bias.detach().sum())


def test_test_with_ckpt_path_best_last_and_file(tmp_path: Any) -> None:
    best = ModelCheckpoint(monitor="val_loss", save_last=True, save_top_k=1)
    trainer = quiet(tmp_path, max_epochs=3, callbacks=[best])
    model = WeightProbe()
    trainer.fit(model, RegressionData())
    path = best.best_model_path
    saved_bias = float(torch.load(path, weights_only=True)["state_dict"]["layer.bias"].sum())
    with torch.no_grad():
        model.layer.bias.fill_(100.0)
    (out,) = trainer.test(model, RegressionData(), ckpt_path="best")
    assert out["bias"] == pytest.approx(saved_bias)
    last_bias = float(torch.load(best.last_model_path, weights_only=True)["state_dict"]["layer.bias"].sum())
    (out,) = trainer.test(model, RegressionData(), ckpt_path="last")
    assert out["bias"] == pytest.approx(last_bias)
    (out,) = trainer.test(model, RegressionData(), ckpt_path=path)
    assert out["bias"] == pytest.approx(saved_bias)
    with torch.no_grad():
        model.layer.bias.fill_(100.0)
    (out,) = trainer.test(datamodule=RegressionData())  # no model, no path: the fit's best checkpoint
    assert out["bias"] == pytest.approx(saved_bias)
    (out,) = trainer.test(model, RegressionData())  # a model, no path: its own weights
    assert out["bias"] == pytest.approx(saved_bias)


def test_ckpt_path_best_without_checkpointing_is_an_error(tmp_path: Any) -> None:
    trainer = quiet(tmp_path, max_epochs=1, enable_checkpointing=False)
    model = Regressor()
    trainer.fit(model, RegressionData())
    with pytest.raises(MisconfigurationError, match="ModelCheckpoint"):
        trainer.test(model, RegressionData(), ckpt_path="best")


def test_weights_only_checkpoint_cannot_resume_fit(tmp_path: Any) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "w", save_weights_only=True)
    trainer = quiet(tmp_path, max_epochs=1, callbacks=[ckpt])
    trainer.fit(Regressor(), RegressionData())
    saved = torch.load(ckpt.best_model_path, weights_only=True)
    assert "state_dict" in saved and "optimizer_states" not in saved and "loops" not in saved
    with pytest.raises(Exception, match="weights only"):
        quiet(tmp_path, max_epochs=2).fit(Regressor(), RegressionData(), ckpt_path=ckpt.best_model_path)


# ---------------------------------------------------------------- trainer.state, stage flags, module helpers
def test_state_and_stage_flags(tmp_path: Any) -> None:
    seen: dict[str, tuple] = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            seen["train"] = (trainer.state.fn, trainer.state.stage, trainer.training)

        def on_validation_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int,
                                      dataloader_idx: int = 0) -> None:
            key = "sanity" if trainer.sanity_checking else "val"
            seen[key] = (trainer.state.fn, trainer.state.stage, trainer.validating or trainer.sanity_checking)

        def on_test_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
            seen["test"] = (trainer.state.fn, trainer.state.stage, trainer.testing)

    trainer = quiet(tmp_path, max_epochs=1, callbacks=[Watch()])
    model = Regressor()
    trainer.fit(model, RegressionData())
    trainer.test(model, RegressionData())
    assert seen["train"] == ("fit", "train", True)
    assert seen["sanity"] == ("fit", "sanity_check", True)
    assert seen["val"] == ("fit", "validate", True)
    assert seen["test"] == ("test", "test", True)
    assert trainer.state.finished and trainer.state.stage is None


def test_module_helpers(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    seen: dict[str, Any] = {}

    class Helpers(Regressor):
        def on_train_start(self) -> None:
            self.print("hello from rank zero")
            seen.update(dtype=self.dtype, on_gpu=self.on_gpu, logger=self.logger, loggers=self.loggers,
                        gathered=self.all_gather(torch.tensor([1.0, 2.0])), rank=self.global_rank)

    quiet(tmp_path, max_epochs=1).fit(Helpers(), RegressionData())
    assert "hello from rank zero" in capsys.readouterr().out
    assert seen["dtype"] == torch.float32 and seen["on_gpu"] is False and seen["rank"] == 0
    assert seen["logger"] is None and seen["loggers"] == []
    assert torch.equal(seen["gathered"], torch.tensor([1.0, 2.0]))  # one process: the data as it is


# ---------------------------------------------------------------- hook order and restore order
def test_callbacks_run_before_the_module(tmp_path: Any) -> None:
    order: list[str] = []

    class Module(Regressor):
        def on_fit_start(self) -> None:
            order.append("module:on_fit_start")

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                order.append("module:on_train_batch_end")

    class First(Callback):
        def on_fit_start(self, trainer: Any, module: Any) -> None:
            order.append("callback:on_fit_start")

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                order.append("callback:on_train_batch_end")

    quiet(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[First()]).fit(Module(), RegressionData())
    assert order == ["callback:on_fit_start", "module:on_fit_start",
                     "callback:on_train_batch_end", "module:on_train_batch_end"]


class Counter(Callback):
    """A stateful callback that reports what state it has in on_fit_start (fine-tuning callbacks rely on it)."""

    def __init__(self) -> None:
        self.batches = 0
        self.at_fit_start: int | None = None

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self.at_fit_start = self.batches

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.batches = state_dict["batches"]


def test_callback_state_is_restored_before_on_fit_start(tmp_path: Any) -> None:
    quiet(tmp_path, max_epochs=1, callbacks=[Counter()]).fit(Regressor(), RegressionData())
    counter = Counter()
    trainer = quiet(tmp_path, max_epochs=2, callbacks=[counter])
    trainer.fit(Regressor(), RegressionData(), ckpt_path="last")
    assert counter.at_fit_start == 8 and counter.batches == 16


def test_epoch_scheduler_steps_before_callbacks_epoch_end(tmp_path: Any) -> None:
    lrs: list[float] = []

    class Decay(Regressor):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    class ReadLR(Callback):
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet(tmp_path, max_epochs=2, callbacks=[ReadLR()]).fit(Decay(lr=1.0), DataLoader(regression(16), batch_size=8))
    assert lrs == [0.5, 0.25]


# ---------------------------------------------------------------- several evaluation dataloaders
class TwoLoaders(Regressor):
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))
        self.log("count", float(len(x)), reduce_fx="sum", add_dataloader_idx=False)


def test_several_validation_dataloaders(tmp_path: Any) -> None:
    trainer = quiet(tmp_path, max_epochs=1)
    model = TwoLoaders()
    loaders = [DataLoader(regression(16, 1), batch_size=8), DataLoader(regression(8, 2), batch_size=4)]
    trainer.fit(model, DataLoader(regression(16), batch_size=8), loaders)
    assert {"val_loss/dataloader_idx_0", "val_loss/dataloader_idx_1"} <= set(trainer.callback_metrics)
    assert trainer.num_val_batches == [2, 2]
    results = trainer.validate(model, {"a": loaders[0], "b": loaders[1]})
    assert len(results) == 2
    assert set(results[0]) == {"val_loss/dataloader_idx_0", "count"}
    assert set(results[1]) == {"val_loss/dataloader_idx_1", "count"}
    assert results[0]["count"] == 24.0  # logged without the suffix: summed over both loaders


def test_several_dataloaders_need_dataloader_idx(tmp_path: Any) -> None:
    trainer = quiet(tmp_path, max_epochs=1)
    loaders = [DataLoader(regression(8, 1), batch_size=8)] * 2
    with pytest.raises(RuntimeError, match="dataloader_idx"):
        trainer.validate(Regressor(), loaders)


def test_several_predict_dataloaders(tmp_path: Any) -> None:
    class Predict(Regressor):
        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
            return torch.full((len(batch[0]),), float(dataloader_idx))

    out = quiet(tmp_path).predict(Predict(), [DataLoader(regression(8), batch_size=4),
                                               DataLoader(regression(4), batch_size=4)])
    assert [len(p) for p in out] == [2, 1] and float(out[1][0][0]) == 1.0


# ---------------------------------------------------------------- seeding DataLoader workers
class Noisy(Dataset):
    """An augmentation drawn in the worker: its numbers depend on how the worker was seeded."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(1)


def _worker_draws(seed: int) -> list[float]:
    seed_everything(seed, workers=True)
    draws: list[float] = []

    class Draw(Regressor):
        def predict_step(self, batch: Any, batch_idx: int) -> None:
            draws.extend(batch.flatten().tolist())

    quiet(os.getcwd()).predict(Draw(), DataLoader(Noisy(), batch_size=2, num_workers=2))
    return draws


def test_seed_everything_workers(tmp_path: Any) -> None:
    try:
        first, again = _worker_draws(7), _worker_draws(7)
        assert first == again and len(set(first)) == 8
        assert os.environ["PL_GLOBAL_SEED"] == "7" and os.environ["PL_SEED_WORKERS"] == "1"
    finally:
        seed_everything(0, workers=False)


# ---------------------------------------------------------------- fast_dev_run
def test_fast_dev_run(tmp_path: Any) -> None:
    trainer = Trainer(default_root_dir=tmp_path, fast_dev_run=True, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(Regressor(), RegressionData())
    assert trainer.global_step == 1 and trainer.num_val_batches == [1]
    assert not (tmp_path / "checkpoints").exists() and trainer.loggers == []


def test_16_mixed_on_cpu_falls_back_to_bf16_as_lightning_does(tmp_path: Any) -> None:
    with pytest.warns(UserWarning, match="Using precision='bf16-mixed' instead"):
        trainer = quiet(tmp_path, precision="16-mixed")
    assert trainer.precision == "bf16-mixed"


# ---------------------------------------------------------------- epoch ends: Lightning's order
def test_callbacks_log_and_read_at_epoch_ends(tmp_path: Any) -> None:
    seen: dict[str, float] = {}

    class LogsAtEpochEnd(Callback):
        def on_validation_epoch_end(self, trainer: Any, module: Any) -> None:
            seen["val_loss"] = float(trainer.callback_metrics["val_loss"])  # this epoch's value, before the read
            module.log("from_callback", 3.0)

    stopper = EarlyStopping(monitor="from_callback", patience=5)
    trainer = quiet(tmp_path, max_epochs=1, callbacks=[LogsAtEpochEnd(), stopper])
    model = Regressor()
    trainer.fit(model, RegressionData())
    assert float(trainer.callback_metrics["from_callback"]) == 3.0 and float(stopper.best_score) == 3.0
    assert seen["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    (out,) = trainer.validate(model, RegressionData())
    assert out["from_callback"] == 3.0


def test_default_progress_bar_with_several_dataloaders(tmp_path: Any) -> None:
    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_model_summary=False)
    loaders = [DataLoader(regression(8, 1), batch_size=4), DataLoader(regression(4, 2), batch_size=4)]
    assert len(trainer.validate(TwoLoaders(), loaders)) == 2


def test_predict_without_returning_predictions(tmp_path: Any) -> None:
    written: list[torch.Tensor] = []

    class Writer(Callback):
        def on_predict_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int,
                                 dataloader_idx: int = 0) -> None:
            written.append(outputs)

    class Predict(Regressor):
        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(batch[0])

    trainer = quiet(tmp_path, callbacks=[Writer()])
    assert trainer.predict(Predict(), DataLoader(regression(8), batch_size=4), return_predictions=False) is None
    assert len(written) == 2 and trainer.predict_loop.predictions == [[]]


def test_a_lightning_hook_distloop_does_not_call_is_refused(tmp_path: Any) -> None:
    class WarmUp(Regressor):
        def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any) -> None:
            optimizer.step(closure=optimizer_closure)

    with pytest.raises(MisconfigurationError, match="optimizer_step.*LR scheduler"):
        quiet(tmp_path, max_epochs=1).fit(WarmUp(), RegressionData())


def test_rank_zero_only_values_are_not_synced(tmp_path: Any) -> None:
    class RankZero(Regressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", F.mse_loss(self(x), y), rank_zero_only=True, sync_dist=True)

    trainer = quiet(tmp_path, max_epochs=1)
    trainer.fit(RankZero(), RegressionData())
    assert "val_loss" in trainer.callback_metrics


class NoisyPairs(Dataset):
    """(x, y) with an augmentation drawn in the worker process."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.full((4,), float(i)) / 32 + torch.rand(4)
        return x, x.sum(dim=0, keepdim=True)


class CrashAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def _noisy_fit(root: Any, crash: int | None = None, ckpt_path: str | None = None) -> list[list[float]]:
    seen: list[list[float]] = []

    class Record(Regressor):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            seen.append(batch[0][:, 0].tolist())
            return super().training_step(batch, batch_idx)

    seed_everything(3, workers=True)
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=os.path.join(root, "ck"), save_top_k=-1)]  # epoch ends
    if crash is not None:
        callbacks.append(CrashAtStep(crash))
    trainer = quiet(root, max_epochs=3, callbacks=callbacks, seed=3)
    try:
        trainer.fit(Record(), DataLoader(NoisyPairs(), batch_size=8, shuffle=True, num_workers=2), ckpt_path=ckpt_path)
    except RuntimeError:
        pass
    return seen


def test_worker_augmentations_resume_exactly_in_a_later_epoch(tmp_path: Any) -> None:
    """Each epoch's workers are seeded from (seed, rank, epoch): a run resumed at the start of its
    third epoch draws the augmentations an uninterrupted one draws there."""
    try:
        full = _noisy_fit(tmp_path / "full")
        first = _noisy_fit(tmp_path / "part", crash=9)  # in the third epoch (4 batches an epoch)
        resumed = _noisy_fit(tmp_path / "part", ckpt_path="last")  # from the second epoch's end
    finally:
        seed_everything(0, workers=False)
    assert len(full) == 12 and first[:8] + resumed == full
