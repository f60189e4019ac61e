"""ModelCheckpoint as a Lightning user sees it: file names, what is kept, the attributes, on one and two ranks."""

import copy
import io
import os
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import EarlyStopping, LoopModule, MisconfigurationError, ModelCheckpoint, ProgressBar, Trainer
from distloop.callbacks import ModelSummary, TQDMProgressBar
from distloop.checkpoint import load


class Scripted(LoopModule):
    """Logs ``val_loss`` from a script, one value per epoch (offset per rank when ``per_rank`` is set)."""

    def __init__(self, val_losses=(), per_rank=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.val_losses = list(val_losses)
        self.per_rank = per_rank

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        value = self.val_losses[self.current_epoch] + self.per_rank * self.global_rank
        self.log("val_loss", torch.tensor(value))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)  # 4 steps an epoch


def fit(root, callbacks, module=None, validate=True, **kwargs):
    kwargs = {"max_epochs": 3, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "num_sanity_val_steps": 0, "accelerator": "cpu", **kwargs}
    trainer = Trainer(default_root_dir=str(root), callbacks=callbacks, **kwargs)
    module = module or Scripted([3.0, 1.0, 2.0, 0.5, 0.7])
    trainer.fit(module, loader(), loader() if validate else None)
    return trainer


def names(directory):
    return sorted(os.listdir(directory))


def test_the_default_keeps_the_newest_epoch_end_file(tmp_path):
    checkpoint = ModelCheckpoint()
    trainer = fit(tmp_path, [checkpoint], validate=False)
    directory = tmp_path / "checkpoints"
    assert names(directory) == ["epoch=2-step=12.ckpt"]  # the finished epoch's index, as in Lightning
    assert checkpoint.best_model_path == str(directory / "epoch=2-step=12.ckpt")
    assert checkpoint.best_model_score is None and checkpoint.best_k_models == {}
    assert checkpoint.last_model_path == "" and checkpoint.save_top_k == 1 and checkpoint.every_n_epochs == 1
    assert load(checkpoint.best_model_path)["global_step"] == trainer.global_step == 12


@pytest.mark.parametrize(("filename", "auto", "metrics", "expected"), [
    (None, True, {"epoch": 3, "step": 120}, "epoch=3-step=120.ckpt"),
    ("{epoch:03d}", True, {"epoch": 5}, "epoch=005.ckpt"),
    ("epoch_{epoch:03d}", True, {"epoch": 5}, "epoch_epoch=005.ckpt"),
    ("epoch_{epoch:03d}", False, {"epoch": 5}, "epoch_005.ckpt"),
    ("{epoch}-{val_loss:.2f}", True, {"epoch": 2, "val_loss": torch.tensor(0.123456)}, "epoch=2-val_loss=0.12.ckpt"),
    ("{val_loss}", True, {"val_loss": torch.tensor(0.125)}, "val_loss=0.125.ckpt"),
    ("{val_loss}", True, {"val_loss": torch.tensor(0.1)}, "val_loss=0.10000000149011612.ckpt"),  # float32's value
    ("{missing:d}", True, {}, "missing=0.ckpt"),
    ("{epoch}-{val/acc:.1f}", True, {"epoch": 1, "val/acc": torch.tensor(0.75)}, "epoch=1-val/acc=0.8.ckpt"),
    ("e{epoch}-acc{val/acc:.2f}", False, {"epoch": 1, "val/acc": torch.tensor(0.75)}, "e1-acc0.75.ckpt"),
])
def test_file_names_are_lightnings(tmp_path, filename, auto, metrics, expected):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), filename=filename, auto_insert_metric_name=auto)
    assert checkpoint.format_checkpoint_name(metrics) == os.path.join(os.path.realpath(tmp_path), expected)


def test_format_checkpoint_name_takes_a_template_and_a_version():
    checkpoint = ModelCheckpoint(filename="{epoch}")
    assert checkpoint.format_checkpoint_name({"epoch": 2, "val_loss": 0.12}, filename="{epoch:d}") == "epoch=2.ckpt"
    assert checkpoint.format_checkpoint_name({"epoch": 2}, ver=3) == "epoch=2-v3.ckpt"
    assert (ModelCheckpoint.CHECKPOINT_JOIN_CHAR, ModelCheckpoint.CHECKPOINT_EQUALS_CHAR,
            ModelCheckpoint.CHECKPOINT_NAME_LAST, ModelCheckpoint.FILE_EXTENSION) == ("-", "=", "last", ".ckpt")


def test_top_k_keeps_the_best_and_knows_the_kth(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="val_loss", save_top_k=2,
                                 filename="{epoch}-{val_loss:.1f}")
    fit(tmp_path / "root", [checkpoint], max_epochs=5)  # val_loss 3, 1, 2, 0.5, 0.7
    best, kth = str(tmp_path / "epoch=3-val_loss=0.5.ckpt"), str(tmp_path / "epoch=4-val_loss=0.7.ckpt")
    assert names(tmp_path) == ["epoch=3-val_loss=0.5.ckpt", "epoch=4-val_loss=0.7.ckpt"]
    assert checkpoint.best_model_path == best and checkpoint.kth_best_model_path == kth
    assert isinstance(checkpoint.best_model_score, torch.Tensor) and checkpoint.best_model_score.item() == 0.5
    assert checkpoint.kth_value.item() == pytest.approx(0.7)
    assert {path: score.item() for path, score in checkpoint.best_k_models.items()} == pytest.approx(
        {best: 0.5, kth: 0.7})
    checkpoint.to_yaml()
    assert yaml.safe_load((tmp_path / "best_k_models.yaml").read_text()) == pytest.approx({best: 0.5, kth: 0.7})


def test_mode_max_and_save_all(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="val_loss", mode="max", save_top_k=-1)
    fit(tmp_path / "root", [checkpoint], max_epochs=3)  # val_loss 3, 1, 2
    # Lightning's default name has no monitored value in it.
    assert names(tmp_path) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt"]
    assert checkpoint.best_model_score.item() == 3.0 and len(checkpoint.best_k_models) == 3


def test_save_last_links_to_the_newest_kept_file(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="val_loss", save_top_k=1, save_last=True)
    trainer = fit(tmp_path / "root", [checkpoint], max_epochs=4)  # val_loss 3, 1, 2, 0.5: epoch 2 is not kept
    last = tmp_path / "last.ckpt"
    assert checkpoint.last_model_path == str(last)
    assert os.path.islink(last) and os.path.realpath(last) == os.path.realpath(checkpoint.best_model_path)
    assert names(tmp_path) == ["epoch=3-step=16.ckpt", "last.ckpt"]
    assert load(str(last))["global_step"] == trainer.global_step


def test_save_last_without_top_k_keeps_only_the_newest_state(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=0, save_last=True, every_n_train_steps=3)
    trainer = fit(tmp_path / "root", [checkpoint], max_epochs=2, validate=False)  # 8 steps: saves at 3 and 6
    assert names(tmp_path) == ["last.ckpt"] and not os.path.islink(tmp_path / "last.ckpt")
    assert load(str(tmp_path / "last.ckpt"))["global_step"] == 6 and trainer.global_step == 8
    assert checkpoint.best_model_path == "" and checkpoint.last_model_path == str(tmp_path / "last.ckpt")


def test_every_n_epochs(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), every_n_epochs=2, save_top_k=-1)
    fit(tmp_path / "root", [checkpoint], max_epochs=5, validate=False)
    assert names(tmp_path) == ["epoch=1-step=8.ckpt", "epoch=3-step=16.ckpt"]


def test_save_weights_only(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), save_weights_only=True)
    fit(tmp_path / "root", [checkpoint], max_epochs=1, validate=False)
    saved = load(checkpoint.best_model_path)
    assert "state_dict" in saved and "optimizer_states" not in saved and "loops" not in saved


def test_verbose_says_what_it_keeps(tmp_path, capsys):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="val_loss", save_top_k=1, verbose=True,
                                 filename="{epoch}")
    fit(tmp_path / "root", [checkpoint], max_epochs=3)  # val_loss 3, 1, 2
    err = capsys.readouterr().err
    path = str(tmp_path / "epoch=1.ckpt")
    assert (f"Epoch 1, global step 8: 'val_loss' reached 1.00000 (best 1.00000), saving model to {path!r} "
            "as top 1") in err
    assert "Epoch 2, global step 12: 'val_loss' was not in top 1" in err


def test_the_version_counter_keeps_an_earlier_runs_file(tmp_path):
    fit(tmp_path, [ModelCheckpoint()], max_epochs=2, validate=False)
    fit(tmp_path, [ModelCheckpoint()], max_epochs=2, validate=False)
    assert names(tmp_path / "checkpoints") == ["epoch=1-step=8-v1.ckpt", "epoch=1-step=8.ckpt"]
    fit(tmp_path / "again", [ModelCheckpoint(enable_version_counter=False)], max_epochs=2, validate=False)
    fit(tmp_path / "again", [ModelCheckpoint(enable_version_counter=False)], max_epochs=2, validate=False)
    assert names(tmp_path / "again" / "checkpoints") == ["epoch=1-step=8.ckpt"]


def test_resuming_continues_the_books(tmp_path):
    def callback():
        return ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_top_k=2, filename="{epoch}")

    fit(tmp_path, [callback()], max_epochs=2)  # val_loss 3, 1
    resumed = callback()
    trainer = Trainer(default_root_dir=str(tmp_path), callbacks=[resumed], max_epochs=4, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Scripted([3.0, 1.0, 2.0, 0.5]), loader(), loader(),
                ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    assert names(tmp_path / "ckpt") == ["epoch=1.ckpt", "epoch=3.ckpt"]  # epoch 0 (3.0) and 2 (2.0) dropped
    assert resumed.best_model_path == str(tmp_path / "ckpt" / "epoch=3.ckpt")
    assert resumed.kth_best_model_path == str(tmp_path / "ckpt" / "epoch=1.ckpt")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"save_top_k": 2}, "no quantity for top_k to track"),
    ({"save_top_k": -2}, "save_top_k=-2"),
    ({"every_n_train_steps": 2, "every_n_epochs": 1}, "mutually exclusive"),
    ({"mode": "best"}, "'min' or 'max'"),
    ({"save_on_exception": True}, "not supported"),
])
def test_bad_arguments_say_what_to_change(kwargs, message):
    with pytest.raises(MisconfigurationError, match=message):
        ModelCheckpoint(**kwargs)


def test_a_missing_monitor_after_validation_is_an_error(tmp_path):
    with pytest.raises(MisconfigurationError, match="could not find the monitored key"):
        fit(tmp_path, [ModelCheckpoint(monitor="val_acc")], max_epochs=1)


def test_callbacks_deep_copy_and_pickle_for_a_new_trainer(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="val_loss")
    trainer = fit(tmp_path / "root", [checkpoint, EarlyStopping("val_loss"), ModelSummary(), TQDMProgressBar()],
                  max_epochs=2)
    copies = copy.deepcopy(trainer.callbacks)
    assert [type(cb) for cb in copies] == [type(cb) for cb in trainer.callbacks]
    clone = next(cb for cb in copies if isinstance(cb, ModelCheckpoint))
    assert clone.best_model_path == checkpoint.best_model_path and clone.best_k_models is not checkpoint.best_k_models
    bar = next(cb for cb in pickle.loads(pickle.dumps(trainer.callbacks)) if isinstance(cb, ProgressBar))
    assert bar.stream is sys.stderr  # looked up when used, not pickled
    fit(tmp_path / "fold", copies, max_epochs=1)


def test_a_progress_bar_copy_writes_to_the_same_stream():
    stream = io.StringIO()
    clone = copy.deepcopy(TQDMProgressBar(stream=stream))
    assert clone.stream is stream


def _same_books_on_every_rank(rank, world_size, root, out):
    checkpoint = ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=2, save_last=True,
                                 filename="{epoch}-{val_loss:.2f}")
    trainer = Trainer(max_epochs=4, strategy="ddp", accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                      callbacks=[checkpoint])
    trainer.fit(Scripted([3.0, 1.0, 2.0, 0.5], per_rank=10.0), loader(32), loader(32))  # rank 1 logs 10 more
    torch.save({"best": checkpoint.best_model_path, "score": checkpoint.best_model_score,
                "k": {p: s.item() for p, s in checkpoint.best_k_models.items()}, "kth": checkpoint.kth_best_model_path,
                "last": checkpoint.last_model_path}, f"{out}-{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_every_rank_keeps_rank_zeros_books(tmp_path):
    root = str(tmp_path / "ckpt")
    spawn(_same_books_on_every_rank, 2, root, str(tmp_path / "r"), init=False, timeout=150)
    zero, one = (torch.load(tmp_path / f"r-{rank}.pt", weights_only=True) for rank in range(2))
    assert zero == one  # rank 1's own values (10 higher) decided nothing
    assert zero["best"] == os.path.join(root, "epoch=3-val_loss=0.50.ckpt") and zero["score"].item() == 0.5
    assert zero["kth"] == os.path.join(root, "epoch=1-val_loss=1.00.ckpt")
    assert zero["last"] == os.path.join(root, "last.ckpt")
    assert sorted(os.listdir(root)) == ["epoch=1-val_loss=1.00.ckpt", "epoch=3-val_loss=0.50.ckpt", "last.ckpt"]
