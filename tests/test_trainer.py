"""The runner on one device: Trainer, loops, hooks, callbacks, loggers."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distloop import Callback, EarlyStopping, LoopModule, MisconfigurationError, Trainer
from distloop.loggers import CSVLogger, TensorBoardLogger
from distloop.loops import TrainingEpochLoop


def make_data(n=64, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


class Linear(LoopModule):
    def __init__(self, lr=0.05, log_val=True):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.lr = lr
        self.log_val = log_val

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("loss", loss, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.log_val:
            self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.mse_loss(self(x), y), reduce_fx="sum")

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(**kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_progress_bar", False)
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("accelerator", "cpu")
    return Trainer(**kwargs)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_epoch_start(self, trainer, module):
        self.calls.append(("train_epoch_start", trainer.current_epoch))

    def on_validation_start(self, trainer, module):
        self.calls.append(("val_start", trainer.sanity_checking, trainer.global_step))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.calls.append(("batch_end", batch_idx))

    def on_train_epoch_end(self, trainer, module):
        self.calls.append(("train_epoch_end", trainer.current_epoch, "loss_epoch" in trainer.callback_metrics))


def test_fit_trains_and_counts():
    data = make_data()
    module = Linear()
    t = trainer(max_epochs=5, log_every_n_steps=4)
    before = F.mse_loss(module(torch.cat([x for x, _ in data])), torch.cat([y for _, y in data])).item()
    t.fit(module, data, data)
    after = t.callback_metrics["val_loss"].item()
    assert after < before / 4
    assert t.global_step == 5 * len(data)
    assert t.current_epoch == 5
    assert set(t.logged_metrics) == {"loss_step", "loss_epoch", "val_loss"}
    assert isinstance(t.progress_bar_metrics["loss_epoch"], float)


class LossRecorder(Linear):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses = getattr(self, "losses", []) + [loss.detach().clone()]
        return loss


class Spy(Callback):
    """Overrides two hooks and records every argument they get."""

    def __init__(self):
        self.batch_end, self.before_backward = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batch_end.append((trainer, module, outputs, batch, batch_idx))

    def on_before_backward(self, trainer, module, loss):
        self.before_backward.append((trainer, module, loss.detach().clone()))


def test_hooks_run_in_order_and_only_where_overridden(monkeypatch):
    # Every hook a callback inherits from Callback counts its calls: none may happen for a hook not overridden.
    inherited = []
    for name in [n for n in vars(Callback) if n.startswith("on_")]:
        def counting(self, *args, _name=name, **kwargs):
            inherited.append((type(self).__name__, _name))
        monkeypatch.setattr(Callback, name, counting)
    rec, spy = Recorder(), Spy()
    t = trainer(max_epochs=2, callbacks=[rec, spy], num_sanity_val_steps=1)
    data = make_data(n=24)
    module = LossRecorder()
    t.fit(module, data, data)
    assert rec.calls == [
        ("val_start", True, 0),
        ("train_epoch_start", 0), ("batch_end", 0), ("batch_end", 1), ("batch_end", 2),
        ("val_start", False, 3), ("train_epoch_end", 0, True),
        ("train_epoch_start", 1), ("batch_end", 0), ("batch_end", 1), ("batch_end", 2),
        ("val_start", False, 6), ("train_epoch_end", 1, True),
    ]
    # Hooks nobody overrides (on_before_backward for Recorder, on_validation_start for Spy, ...) never ran.
    assert inherited == []
    # Overridden hooks ran once per event, with Lightning's arguments.
    assert len(spy.batch_end) == 2 * len(data) and len(module.losses) == 2 * len(data)
    for i, (trainer_arg, module_arg, outputs, batch, batch_idx) in enumerate(spy.batch_end):
        assert trainer_arg is t and module_arg is module
        assert batch_idx == i % len(data)
        assert all(torch.equal(a, b) for a, b in zip(batch, data[batch_idx], strict=True))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs  # what training_step returned
        assert isinstance(loss, torch.Tensor) and torch.equal(loss.detach(), module.losses[i])
    assert len(spy.before_backward) == 2 * len(data)  # once per backward (no accumulation)
    for (trainer_arg, module_arg, loss), logged in zip(spy.before_backward, module.losses):
        assert trainer_arg is t and module_arg is module and torch.equal(loss, logged)


def test_gradient_accumulation_equals_a_doubled_batch():
    small, big = make_data(batch=4), make_data(batch=8)
    a, b = Linear(lr=0.1), Linear(lr=0.1)
    trainer(max_epochs=3, accumulate_grad_batches=2).fit(a, small)
    trainer(max_epochs=3).fit(b, big)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_limits_and_max_steps_stop_where_they_should():
    data = make_data()  # 8 batches
    t = trainer(max_epochs=3, limit_train_batches=3, limit_val_batches=0.5, num_sanity_val_steps=0)
    rec = Recorder()
    t.callbacks.append(rec)
    t.fit(Linear(), data, data)
    assert t.global_step == 9
    assert t.num_val_batches == [4]

    t = trainer(max_epochs=10, max_steps=11)
    t.fit(Linear(), data)
    assert t.global_step == 11 and t.current_epoch == 2

    t = trainer(max_steps=3)  # max_epochs unset: unlimited epochs, max_steps decides
    t.fit(Linear(), data)
    assert t.global_step == 3 and t.max_epochs == -1


@pytest.mark.parametrize("interval, every_n, expected", [(0.5, 1, 4), (3, 1, 4), (1.0, 2, 1)])
def test_val_check_interval_and_every_n_epochs(interval, every_n, expected):
    rec = Recorder()
    t = trainer(max_epochs=2, val_check_interval=interval, check_val_every_n_epoch=every_n,
                num_sanity_val_steps=0, callbacks=[rec])
    t.fit(Linear(), make_data(), make_data(n=16))  # 8 training batches per epoch
    assert sum(1 for c in rec.calls if c[0] == "val_start") == expected


def test_validate_test_predict_return_what_they_should():
    data = make_data(n=20, batch=8)  # batches of 8, 8, 4
    module = Linear()
    t = trainer()
    [val] = t.validate(module, data)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        assert val["val_loss"] == pytest.approx(F.mse_loss(module(x), y).item(), rel=1e-5)  # batch-size weighted
        [test] = t.test(module, data)
        expected_sum = sum(F.mse_loss(module(bx), by).item() for bx, by in data)
        assert test["test_loss"] == pytest.approx(expected_sum, rel=1e-5)
        predictions = t.predict(module, data)
        assert [p.shape[0] for p in predictions] == [8, 8, 4]
        torch.testing.assert_close(torch.cat(predictions), module(x))


def test_fit_again_starts_clean():
    data = make_data()
    stopper = EarlyStopping(monitor="val_loss", patience=1)
    t = trainer(max_epochs=2, callbacks=[stopper])
    t.fit(Linear(), data, data)
    first = (t.global_step, dict(t.callback_metrics))
    stopper.wait_count = 99  # a leak would stop the second fit at once
    module = Linear()
    t.fit(module, data, data)
    assert t.global_step == first[0] == 16 and t.current_epoch == 2
    torch.testing.assert_close(t.callback_metrics["val_loss"], first[1]["val_loss"])
    assert stopper.wait_count < 99


FOLD_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_trainer import Linear, make_data, trainer
fold = make_data()[{fold}::3]
module = Linear()
trainer(max_epochs=2, seed=7).fit(module, fold)
torch.save(module.state_dict(), {out!r})
"""


def test_three_folds_on_one_trainer_equal_fresh_processes(tmp_path):
    import subprocess
    import sys

    data = make_data()
    shared = trainer(max_epochs=2, seed=7)
    for fold in range(3):
        module = Linear()
        shared.fit(module, data[fold::3])
        out = tmp_path / f"fold{fold}.pt"
        script = FOLD_SCRIPT.format(tests=os.path.dirname(__file__), fold=fold, out=str(out))
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        fresh = torch.load(out, weights_only=True)
        for name, value in module.state_dict().items():
            assert torch.equal(value, fresh[name]), (fold, name)


def test_early_stopping_stops_and_requires_its_metric():
    class Flat(Linear):
        def validation_step(self, batch, batch_idx):
            self.log("val_flat", 1.0)

    stopper = EarlyStopping(monitor="val_flat", patience=2)
    t = trainer(max_epochs=10, callbacks=[stopper])
    t.fit(Flat(), make_data(), make_data())
    assert t.current_epoch == 3  # best at epoch 0, then two epochs without improvement
    assert stopper.stopped_epoch == 2 and t.should_stop

    t = trainer(max_epochs=2, callbacks=[EarlyStopping(monitor="missing")])
    with pytest.raises(MisconfigurationError, match="'missing', which was not logged"):
        t.fit(Linear(), make_data(), make_data())


def test_schedulers_step_per_interval():
    class Scheduled(Linear):
        def __init__(self, interval):
            super().__init__()
            self.interval = interval

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1.0)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}

    for interval, steps in (("step", 16), ("epoch", 2)):
        t = trainer(max_epochs=2, limit_train_batches=8)
        module = Scheduled(interval)
        t.fit(module, make_data())
        assert t.optimizer.param_groups[0]["lr"] == 0.5 ** steps


def test_a_replaced_epoch_loop_runs():
    class TwoPassEpochLoop(TrainingEpochLoop):
        def advance(self, dataloader):
            batch, batch_idx = self.fetch_batch()
            for _ in range(2):
                self.optimization.run(self.trainer, batch, batch_idx, accumulating=False)
            self.batch_progress.increment_completed()

    t = trainer(max_epochs=2)
    t.fit_loop.replace(epoch_loop=TwoPassEpochLoop)
    assert isinstance(t.fit_loop.epoch_loop, TwoPassEpochLoop)
    t.fit(Linear(), make_data())
    assert t.global_step == 2 * 2 * 8


def test_csv_and_tensorboard_loggers_write_from_a_run(tmp_path):
    csv_logger = CSVLogger(str(tmp_path / "csv"))
    tb_logger = TensorBoardLogger(str(tmp_path))
    t = trainer(max_epochs=2, logger=[csv_logger, tb_logger], log_every_n_steps=4)
    t.fit(Linear(), make_data(), make_data())
    lines = (tmp_path / "csv" / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "loss_epoch", "loss_step", "step", "val_loss"]  # sorted, as Lightning's
    assert {"val_loss", "loss_epoch", "epoch"} <= set(lines[0].split(","))
    assert len(lines) == 1 + 4 + 2 * 2  # 4 step rows (every 4 of 16 batches) + 2 epochs x (val, train)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb_logger.log_dir))


def test_default_logger_writes_a_new_version_per_trainer(tmp_path):
    a = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, max_epochs=1)
    b = Trainer(default_root_dir=str(tmp_path), enable_progress_bar=False, max_epochs=1)
    assert a.log_dir != b.log_dir
    a.fit(Linear(), make_data())
    assert os.path.exists(os.path.join(a.log_dir, "metrics.csv"))


def test_progress_lines_when_not_a_terminal(capsys):
    t = Trainer(max_epochs=2, logger=False, accelerator="cpu")
    t.fit(Linear(), make_data())
    err = capsys.readouterr().err
    assert "Epoch 0: 8 batches" in err and "Epoch 1: 8 batches" in err and "loss_epoch=" in err
    t = trainer(max_epochs=1, enable_checkpointing=False)
    t.fit(Linear(), make_data())
    assert capsys.readouterr().err == ""


class DtypeRecorder(Linear):
    """Records the dtype of an activation computed inside each training and validation step."""

    def __init__(self):
        super().__init__()
        self.train_dtypes, self.val_dtypes = [], []

    def training_step(self, batch, batch_idx):
        self.train_dtypes.append(self.layer(batch[0]).dtype)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.val_dtypes.append(self.layer(batch[0]).dtype)
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("precision, activation", [("bf16-mixed", torch.bfloat16), (None, torch.float32),
                                                   ("32", torch.float32)])
def test_bf16_mixed_runs_on_cpu(precision, activation):
    data = make_data()
    module = DtypeRecorder()
    x, y = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    before = F.mse_loss(module(x), y).item()
    t = trainer(max_epochs=2, num_sanity_val_steps=0, **({} if precision is None else {"precision": precision}))
    t.fit(module, data, data)
    # The forward ran under the precision's autocast in every step (and only then: none outside it).
    assert module.train_dtypes == [activation] * (2 * len(data))
    assert module.val_dtypes == [activation] * (2 * len(data))
    assert module(x).dtype == torch.float32  # autocast does not leak out of the steps
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: the weights stay float32
    # It still trains.
    assert t.global_step == 2 * len(data) and t.current_epoch == 2
    loss, val_loss = t.callback_metrics["loss_epoch"].item(), t.callback_metrics["val_loss"].item()
    assert math.isfinite(loss) and math.isfinite(val_loss)
    assert val_loss < before / 4


def test_data_from_a_torch_dataloader_and_a_datamodule():
    from distloop import DataModule

    data = make_data(n=32, batch=32)[0]

    class DM(DataModule):
        def __init__(self):
            self.stages = []

        def setup(self, stage):
            self.stages.append(stage)

        def train_dataloader(self):
            return DataLoader(TensorDataset(*data), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return DataLoader(TensorDataset(*data), batch_size=16)

    dm = DM()
    t = trainer(max_epochs=1)
    t.fit(Linear(), datamodule=dm)
    assert dm.stages == ["fit"] and t.global_step == 4 and "val_loss" in t.callback_metrics


# ---------------------------------------------------------------------------- bad input
class NoStep(LoopModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Returns(Linear):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return self.value(loss)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_epochs": -2}, "max_epochs=-2 must be an int >= -1"),
        ({"limit_train_batches": 1.5}, "must be in \\[0, 1\\]"),
        ({"val_check_interval": 0.0}, "val_check_interval"),
        ({"precision": "8"}, "precision='8'"),
        ({"strategy": "deepspeed"}, "strategy='deepspeed' is not known"),
        ({"accelerator": "tpu"}, "accelerator='tpu'"),
        ({"devices": 2}, "only this one process runs"),
        ({"nan_loss": "maybe"}, "nan_loss"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
    ],
)
def test_bad_trainer_arguments_say_what_to_change(kwargs, match):
    with pytest.raises(MisconfigurationError, match=match):
        trainer(**kwargs)


@pytest.mark.parametrize(
    "module, match",
    [
        (NoStep(), "does not define `training_step`"),
        (nn.Linear(4, 1), "takes a distloop.LoopModule"),
        (Returns(lambda loss: None), "returned 'NoneType'"),
        (Returns(lambda loss: {"not_loss": loss}), "a dict without 'loss'"),
        (Returns(lambda loss: loss.repeat(3)), "shape \\(3,\\)"),
        (Returns(lambda loss: loss.detach()), "does not require grad"),
    ],
)
def test_bad_modules_say_what_to_change(module, match):
    with pytest.raises(MisconfigurationError, match=match):
        trainer(max_epochs=1).fit(module, make_data())


def test_multiple_optimizers_are_refused():
    class Two(Linear):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

    with pytest.raises(MisconfigurationError, match="exactly one torch optimizer"):
        trainer(max_epochs=1).fit(Two(), make_data())


def test_nan_loss_raises_or_skips():
    class Nan(Linear):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 3 else loss

    with pytest.raises(FloatingPointError, match="nan_loss='skip'"):
        trainer(max_epochs=1, log_every_n_steps=4).fit(Nan(), make_data())
    module = Nan()
    t = trainer(max_epochs=2, nan_loss="skip")
    t.fit(module, make_data())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert t.global_step == 16


def test_nan_loss_raise_stops_before_the_first_non_finite_update():
    class NanAt(Linear):
        def training_step(self, batch, batch_idx):
            self.before = {k: v.clone() for k, v in self.state_dict().items()}
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step == 5 else loss

    module = NanAt()
    t = trainer(max_epochs=3, log_every_n_steps=50)
    with pytest.raises(FloatingPointError, match="global step 5 .*no update was made"):
        t.fit(module, make_data())
    assert t.global_step == 5
    for name, value in module.state_dict().items():  # the weights the non-finite step started from
        assert torch.equal(value, module.before[name]) and torch.isfinite(value).all(), name


def test_log_outside_a_hook_is_an_error():
    with pytest.raises(MisconfigurationError, match="outside a hook"):
        Linear().log("x", 1.0)
