"""The run's state as named parts (distloop/state.py), and the resumable-point hook callbacks save at."""

import os
import warnings

import pytest
import torch

from distloop import Callback, CheckpointError, Trainer
from distloop.checkpoint import FORMAT, load
from distloop.state import RunState, StateFn
from resume_helpers import Net, loaders


class Counter:
    """A part of the user's own: anything with state_dict / load_state_dict."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


class CountBatches(Callback):
    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.counter.count += 1


class SaveEvery(Callback):
    """A checkpoint callback of the user's own, saving at the resumable points only."""

    def __init__(self, directory: str, every: int) -> None:
        self.directory, self.every, self.points = directory, every, []

    def on_resumable_point(self, trainer, module):
        self.points.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.completed))
        if trainer.global_step % self.every == 0:
            trainer.save_checkpoint(os.path.join(self.directory, f"mine-{trainer.global_step}.ckpt"))


def make(root, *callbacks, **kwargs):
    kwargs = {"max_epochs": 2, "seed": 3, "deterministic": True, "enable_progress_bar": False, "logger": False,
              "accumulate_grad_batches": 2, "accelerator": "cpu", "default_root_dir": str(root), **kwargs}
    return Trainer(callbacks=list(callbacks), **kwargs)


def one_epoch_checkpoint(root) -> str:
    trainer = make(root, max_epochs=1)
    trainer.fit(Net(), *loaders())
    path = str(root / "run.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_run_state_refuses_bad_parts():
    state = RunState()
    state.register("a", Counter())
    with pytest.raises(ValueError, match="registered already"):
        state.register("a", Counter())
    with pytest.raises(ValueError, match="header"):
        state.register("global_step", Counter())
    with pytest.raises(TypeError, match="state_dict"):
        state.register("b", object())


def test_a_registered_part_is_saved_and_restored(tmp_path):
    counter = Counter()
    trainer = make(tmp_path, CountBatches(counter), max_epochs=1)
    trainer.run_state.register("batches_counted", counter)
    trainer.fit(Net(), *loaders())
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["batches_counted"] == {"count": 24}

    fresh = Counter()
    resumed = make(tmp_path, max_epochs=1)
    resumed.run_state.register("batches_counted", fresh)
    resumed.fit(Net(), *loaders(), ckpt_path=path)
    assert fresh.count == 24


def test_a_part_missing_from_the_checkpoint_warns_and_keeps_its_state(tmp_path):
    path = one_epoch_checkpoint(tmp_path)
    counter = Counter()
    counter.count = 7
    resumed = make(tmp_path, max_epochs=1)
    resumed.run_state.register("extra", counter)
    with pytest.warns(UserWarning, match="no 'extra' part"):
        resumed.fit(Net(), *loaders(), ckpt_path=path)
    assert counter.count == 7


def test_checkpoint_keys_are_lightnings_and_the_module_hooks_see_them(tmp_path):
    seen = {}

    class Hooked(Net):
        def on_save_checkpoint(self, checkpoint):
            checkpoint["note"] = "added by the module"

        def on_load_checkpoint(self, checkpoint):
            seen["keys"] = set(checkpoint)
            seen["step"] = self.trainer.global_step  # called before any part is loaded

    trainer = make(tmp_path, max_epochs=1)
    trainer.fit(Hooked(), *loaders())
    path = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(path)
    state = load(path)
    assert state["format"] == FORMAT and state["version"] == 2
    assert list(state)[:5] == ["format", "version", "global_step", "epoch", "world_size"]
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "note"} <= set(state)
    assert set(state["state_dict"]) == set(Net().state_dict())
    make(tmp_path, max_epochs=2).fit(Hooked(), *loaders(), ckpt_path=path)
    assert "note" in seen["keys"] and seen["step"] == 0


def test_a_version_1_checkpoint_still_resumes(tmp_path):
    trainer = make(tmp_path, max_epochs=1)
    trainer.fit(Net(), *loaders())
    path = str(tmp_path / "v2.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    state["version"], state["module"], state["optimizer"] = 1, state.pop("state_dict"), state.pop("optimizer_states")[0]
    old = str(tmp_path / "v1.ckpt")
    torch.save(state, old)
    a, b = Net(), Net()
    make(tmp_path, max_epochs=2).fit(a, *loaders(), ckpt_path=path)
    make(tmp_path, max_epochs=2).fit(b, *loaders(), ckpt_path=old)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_a_checkpoint_of_another_optimizer_count_is_refused(tmp_path):
    path = one_epoch_checkpoint(tmp_path)
    state = torch.load(path, weights_only=True)
    state["optimizer_states"] = state["optimizer_states"] * 2
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="2 optimizer states"):
        make(tmp_path, max_epochs=2).fit(Net(), *loaders(), ckpt_path=path)


def test_resumable_points_are_after_whole_steps_and_epochs(tmp_path):
    saver = SaveEvery(str(tmp_path), every=1000)
    make(tmp_path, saver).fit(Net(), *loaders())
    # 24 batches an epoch, 2 per optimizer step: a point after each step, and one after each epoch.
    steps = [step for step, _ in saver.points]
    assert steps == [*range(1, 13), 12, *range(13, 25), 24]
    assert all(batches % 2 == 0 for _, batches in saver.points)


def test_a_users_own_checkpoint_callback_resumes_exactly(tmp_path):
    full = Net()
    make(tmp_path / "full").fit(full, *loaders())

    class CrashAfter(Callback):
        def on_resumable_point(self, trainer, module):
            if trainer.global_step == 7:
                raise RuntimeError("crash")

    saver = SaveEvery(str(tmp_path), every=5)
    with pytest.raises(RuntimeError, match="crash"):
        make(tmp_path / "part", saver, CrashAfter()).fit(Net(), *loaders())
    resumed = Net()
    make(tmp_path / "part").fit(resumed, *loaders(), ckpt_path=str(tmp_path / "mine-5.ckpt"))
    for (name, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), name


def test_state_fn_is_a_part():
    box = {"v": 1}
    part = StateFn(save=lambda: dict(box), load=box.update)
    state = RunState()
    state.register("box", part)
    saved = state.state_dict(global_step=0, epoch=0, world_size=1)
    box["v"] = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state.load_state_dict(saved, "memory")
    assert box == {"v": 1}


def test_a_timed_checkpoint_saves_when_its_clock_says_so(tmp_path):
    from datetime import timedelta

    from distloop import ModelCheckpoint

    always = ModelCheckpoint(dirpath=str(tmp_path / "timed"), train_time_interval=timedelta(microseconds=1),
                             save_top_k=-1)
    never = ModelCheckpoint(dirpath=str(tmp_path / "hourly"), train_time_interval=timedelta(hours=1), save_top_k=-1)
    trainer = make(tmp_path, always, never, max_epochs=1)
    trainer.fit(Net(), *loaders())
    saved = sorted(os.listdir(tmp_path / "timed"))
    assert len(saved) == trainer.global_step == 12  # due at every resumable point, saved once per step
    assert not os.path.exists(tmp_path / "hourly") or not os.listdir(tmp_path / "hourly")
