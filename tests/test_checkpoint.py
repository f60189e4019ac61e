"""Checkpoint files and exact resume on one process."""

import errno
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distloop import Callback, CheckpointError, MisconfigurationError, ModelCheckpoint, Trainer
from distloop.checkpoint import FORMAT, load, newest_valid, write_atomic
from resume_helpers import CrashAt, Net, epoch_rows, fit, loaders, merged_seen


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit(str(tmp_path_factory.mktemp("full")))


def test_checkpoint_holds_the_whole_run_and_loads_weights_only(tmp_path, uninterrupted):
    trainer, _ = fit(str(tmp_path), max_steps=4)
    state = torch.load(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=True)
    assert state["format"] == FORMAT and state["global_step"] == 4 and state["world_size"] == 1
    assert set(state) >= {"state_dict", "optimizer_states", "lr_schedulers", "precision", "loops", "callbacks", "rng", "config"}
    loop = state["loops"]["fit_loop"]
    assert loop["epoch_loop.batch_progress"]["current"]["completed"] == 8  # two batches per step
    assert loop["epoch_loop.state_dict"] == {"samples_seen": 32}
    assert loop["epoch_loop.results"]["synced"] is True
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}


class LogPosition(Callback):
    """Saves in each checkpoint how many rows the logger had written (and the step): where a resume rejoins the log."""

    def __init__(self) -> None:
        self.trainer = None
        self.loaded: dict | None = None

    def setup(self, trainer, module, stage):
        self.trainer = trainer

    def state_dict(self) -> dict:
        return {"rows": len(self.trainer.loggers[0].rows), "step": self.trainer.global_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded = dict(state_dict)


@pytest.mark.parametrize("crash_at", [3, 12, 13])  # mid-epoch; at the epoch's last step; first step of an epoch
def test_crash_and_resume_is_bitwise_equal(tmp_path, uninterrupted, crash_at):
    full_trainer, full = uninterrupted
    crashed_trainer, crashed = fit(str(tmp_path), CrashAt(crash_at), LogPosition())
    assert crashed_trainer.global_step == crash_at
    position = LogPosition()
    trainer, resumed = fit(str(tmp_path), position, ckpt_path="last")
    assert trainer.global_step == full_trainer.global_step
    assert_same_weights(full, resumed)
    assert merged_seen(crashed, resumed) == merged_seen(full)
    full_log, crashed_log, resumed_log = (t.loggers[0].rows for t in (full_trainer, crashed_trainer, trainer))
    assert position.loaded is not None and resumed_log
    written, resumed_step = position.loaded["rows"], position.loaded["step"]
    full_rows = epoch_rows(full_trainer)
    resumed_rows = epoch_rows(trainer)  # what was logged before the checkpoint is not logged again
    for step, row in resumed_rows.items():
        assert step in full_rows, f"the resumed run logged epoch values at step {step}, the uninterrupted one did not"
        if step > resumed_step:  # at the checkpoint's step, rows logged before the save belong to the crashed run
            assert row == full_rows[step], f"step {step}: every key and value must match the uninterrupted run's"
    # Every row, every key (step values, epoch values, validation values, "epoch"), in order: what the crashed
    # run logged up to the checkpoint, then what the resumed run logged, is what the uninterrupted run logged.
    assert crashed_log[:written] + resumed_log == full_log
    assert epoch_rows(SimpleNamespace(loggers=[SimpleNamespace(rows=crashed_log[:written] + resumed_log)])) == full_rows


def test_resume_twice_within_an_epoch(tmp_path, uninterrupted):
    _, full = uninterrupted
    _, first = fit(str(tmp_path), CrashAt(3))
    _, second = fit(str(tmp_path), CrashAt(5), ckpt_path="last")
    _, third = fit(str(tmp_path), ckpt_path="last")
    assert_same_weights(full, third)
    assert merged_seen(first, second, third) == merged_seen(full)


def test_resume_with_worker_processes(tmp_path):
    _, full = fit(str(tmp_path / "full"), num_workers=2, max_epochs=1)
    _, crashed = fit(str(tmp_path / "part"), CrashAt(5), num_workers=2, max_epochs=1)
    _, resumed = fit(str(tmp_path / "part"), ckpt_path="last", num_workers=2, max_epochs=1)
    assert_same_weights(full, resumed)
    assert merged_seen(crashed, resumed) == merged_seen(full)


def test_resume_does_not_replay_the_loader(tmp_path):
    fit(str(tmp_path), CrashAt(9), max_epochs=1)  # the last checkpoint is step 8's
    _, resumed = fit(str(tmp_path), ckpt_path="last", max_epochs=1)
    # 24 batches per epoch, 2 per step: the resumed run fetches only what is left after step 8.
    assert [batch_idx for _, batch_idx, _ in resumed.seen] == list(range(16, 24))


def test_last_falls_back_to_the_newest_valid_checkpoint(tmp_path, capfd):
    fit(str(tmp_path), CrashAt(5))  # checkpoints at steps 2 and 4
    directory = tmp_path / "checkpoints"
    newest = directory / "epoch=0-step=4.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    path, skipped = newest_valid([str(directory)])
    assert path.endswith("epoch=0-step=2.ckpt") and load(path)["global_step"] == 2
    assert len(skipped) == 1 and str(newest) in skipped[0]
    trainer, _ = fit(str(tmp_path), CrashAt(3), ckpt_path="last")
    assert trainer.global_step == 3
    assert "skipping a bad checkpoint" in capfd.readouterr().err


def test_bad_files_give_errors_naming_them(tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    write_atomic({"format": FORMAT, "version": 1, "x": torch.zeros(1000)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:300])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code = tmp_path / "code.ckpt"
    torch.save(Trainer, code)  # pickles a class reference: weights_only must refuse it
    for path, message in ((truncated, "not a readable"), (foreign, "not a distloop checkpoint"),
                          (code, "not a readable"), (tmp_path / "missing.ckpt", "No checkpoint at")):
        with pytest.raises(CheckpointError, match=message) as err:
            load(str(path))
        assert str(path) in str(err.value)


def test_resuming_an_incompatible_module_lists_the_keys(tmp_path):
    fit(str(tmp_path), CrashAt(3))

    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.net[0] = nn.Linear(6, 64)
            self.extra = nn.Linear(2, 2)

    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(MisconfigurationError) as err:
        trainer.fit(Wider(), loaders()[0], ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"))
    assert "not in the checkpoint" not in str(err.value)
    assert "missing from the checkpoint: ['extra.bias', 'extra.weight']" in str(err.value)
    assert "net.0.weight: checkpoint (32, 6) vs module (64, 6)" in str(err.value)


def test_a_full_disk_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    fit(str(tmp_path), CrashAt(3))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*Earlier checkpoints are intact"):
        fit(str(tmp_path), ckpt_path="last")
    monkeypatch.setattr(torch, "save", real_save)
    names = os.listdir(tmp_path / "checkpoints")
    assert not [n for n in names if n.endswith(".tmp")]
    assert load(str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"))["global_step"] == 2


def test_a_kill_during_a_write_leaves_the_previous_checkpoint_valid(tmp_path):
    target = tmp_path / "a.ckpt"
    write_atomic({"format": FORMAT, "version": 1, "step": 1}, str(target))
    script = textwrap.dedent(f"""
        import os, signal, torch
        from distloop.checkpoint import FORMAT, write_atomic
        def killed_midway(obj, f, *args, **kwargs):
            f.write(b"x" * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed_midway
        write_atomic({{"format": FORMAT, "version": 1, "step": 2}}, {str(target)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == -9
    assert load(str(target))["step"] == 1
    leftovers = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert leftovers  # the partial file stayed hidden and was never renamed into place
    path, skipped = newest_valid([str(tmp_path)])
    assert path == str(target) and not skipped


def test_model_checkpoint_keeps_top_k_and_points_last_at_the_newest(tmp_path):
    class Steady(Net):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    checkpoint = ModelCheckpoint(dirpath=str(tmp_path), monitor="val_loss", save_top_k=2, save_last=True,
                                 filename="{epoch}-{val_loss:.4f}")
    trainer = Trainer(max_epochs=4, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                      accelerator="cpu", seed=1)
    trainer.fit(Steady(), *loaders())
    files = sorted(n for n in os.listdir(tmp_path) if n.endswith(".ckpt") and n != "last.ckpt")
    assert len(files) == 2 and all(n.startswith("epoch=") and "val_loss=" in n for n in files)
    scores = sorted(float(n.split("val_loss=")[1][:-5]) for n in files)
    assert checkpoint.best_model_score == pytest.approx(scores[0], abs=1e-4)
    assert os.path.realpath(tmp_path / "last.ckpt") == os.path.realpath(checkpoint.last_model_path)
    assert load(str(tmp_path / "last.ckpt"))["global_step"] == trainer.global_step


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_and_exits_with_the_distinct_code(tmp_path, uninterrupted, signame):
    import signal

    from distloop import Preempted
    from distloop.callbacks import Callback

    class Term(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 5 and batch_idx % 2 == 1:
                os.kill(os.getpid(), getattr(signal, signame))

    with pytest.raises(Preempted) as stopped:
        fit(str(tmp_path), Term())
    assert stopped.value.code == 75
    assert os.path.basename(stopped.value.checkpoint_path) == "preempted-step=5.ckpt"
    _, resumed = fit(str(tmp_path), ckpt_path="last")
    assert_same_weights(uninterrupted[1], resumed)
    assert signal.getsignal(getattr(signal, signame)) is signal.SIG_DFL  # the handler is gone after fit


def test_snapshot_copies_and_keeps_shared_memory_shared():
    from distloop.checkpoint import snapshot

    weight = torch.randn(4, 3)
    copy = snapshot({"a": weight, "tied": weight, "view": weight[1:], "steps": [torch.tensor(3)]})
    storage = copy["a"].untyped_storage().data_ptr()
    assert copy["tied"].untyped_storage().data_ptr() == copy["view"].untyped_storage().data_ptr() == storage
    assert storage != weight.untyped_storage().data_ptr()
    weight.add_(1.0)
    assert not torch.equal(copy["a"], weight) and torch.equal(copy["view"], copy["a"][1:])
