"""FSDP checkpoints: sharded directories, exact resume on the same and other world sizes and
strategies, a crash mid-save, consolidation into one file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from _spawn import spawn
from distloop import Callback
from distloop.checkpoint import LAST, RUN_FILE, CheckpointError, consolidate, load, newest_valid
from distloop.strategies import FSDPStrategy
from resume_helpers import CrashAt, Net, dataset, fit, merged_seen

pytestmark = pytest.mark.distributed


class FullWeightsAtTrainStart(Callback):
    """The full weights once every part of a checkpoint has loaded (a collective under FSDP)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, module):
        self.weights = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                        for k, v in module.state_dict().items()}


def _strategy(name: str, state_dict_type: str = "sharded"):
    if name == "fsdp":
        return FSDPStrategy(accelerator="cpu", timeout_s=60, shard_modules=[nn.Linear],
                            state_dict_type=state_dict_type)
    return name


def _fit_rank(rank, world_size, root, out, strategy, crash_at, ckpt_path, every, state_dict_type="sharded"):
    start = FullWeightsAtTrainStart()
    callbacks = [start] + ([CrashAt(crash_at)] if crash_at else [])
    trainer, module = fit(root, *callbacks, ckpt_path=ckpt_path, strategy=_strategy(strategy, state_dict_type),
                          max_epochs=2, every=every)
    torch.save({"step": trainer.global_step, "seen": module.seen, "start": start.weights,
                "ckpt_path": trainer.ckpt_path}, f"{out}-rank{rank}.pt")


def run(world_size, root, out, strategy="fsdp", crash_at=0, ckpt_path=None, every=2, state_dict_type="sharded"):
    if world_size == 1:
        _fit_rank(0, 1, str(root), str(out), strategy, crash_at, ckpt_path, every, state_dict_type)
    else:
        spawn(_fit_rank, world_size, str(root), str(out), strategy, crash_at, ckpt_path, every, state_dict_type,
              init=False, timeout=240)
    return [torch.load(f"{out}-rank{r}.pt", weights_only=True) for r in range(world_size)]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    """The state dict of the run's newest checkpoint (the one at its last step)."""
    path, _ = newest_valid([str(root / "checkpoints")])
    assert path is not None
    return load(path)["state_dict"]


@pytest.fixture(scope="module")
def full_fsdp(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    return root, run(2, root, root / "out")


@pytest.mark.timeout(600)
def test_a_sharded_checkpoint_is_a_directory_of_shards_that_resumes_bitwise(tmp_path, full_fsdp):
    full_root, full = full_fsdp
    step4 = full_root / "checkpoints" / "epoch=0-step=4.ckpt"
    assert step4.is_dir() and (step4 / RUN_FILE).is_file() and (step4 / ".metadata").is_file()
    assert sorted(p.name for p in step4.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    run_file = torch.load(step4 / RUN_FILE, weights_only=True)  # no code runs, and no tensor data in it
    assert all(t.is_meta for t in run_file["state_dict"].values())

    crashed = run(2, tmp_path, tmp_path / "crash", crash_at=5)  # the newest checkpoint is step 4's
    resumed = run(2, tmp_path, tmp_path / "resumed", ckpt_path="last")
    assert resumed[0]["ckpt_path"].endswith("epoch=0-step=4.ckpt")
    saved = load(str(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"))["state_dict"]
    for name, value in saved.items():  # right after loading: the saved weights, exactly
        assert torch.equal(resumed[0]["start"][name], value), name
    expected, got = final_weights(full_root), final_weights(tmp_path)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    for rank in range(2):
        assert merged_seen(_Seen(crashed[rank]), _Seen(resumed[rank])) == merged_seen(_Seen(full[rank]))


class _Seen:
    """A rank's record of the batches it saw, as ``merged_seen`` reads it from a module."""

    def __init__(self, result) -> None:
        self.seen = result["seen"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("new_world", [1, 3])
def test_saved_on_two_ranks_resumes_on_another_world_size(tmp_path, new_world):
    # A step is 2 ranks x 2 batches x 4 samples: the checkpoint at step 3 has seen 48 of 96
    # samples, and the other 48 split evenly over 1 or 3 ranks.
    crashed = run(2, tmp_path, tmp_path / "crash", crash_at=4, every=3)
    strategy = "fsdp" if new_world > 1 else "auto"  # one process: no process group, no FSDP
    resumed = run(new_world, tmp_path, tmp_path / "resumed", strategy=strategy, ckpt_path="last", every=3)
    saved = load(str(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"))
    for name, value in saved["state_dict"].items():
        assert torch.equal(resumed[0]["start"][name], value), name
    before = sorted(i for r in crashed for e, b, ids in r["seen"] if e == 0 and b < 6 for i in ids)
    after = sorted(i for r in resumed for e, _, ids in r["seen"] if e == 0 for i in ids)
    assert len(before) == 48
    assert sorted(before + after) == list(range(len(dataset())))  # each sample of the epoch exactly once


@pytest.mark.timeout(600)
def test_a_ddp_checkpoint_continues_under_fsdp(tmp_path):
    run(2, tmp_path, tmp_path / "crash", strategy="ddp", crash_at=5)
    resumed = run(2, tmp_path, tmp_path / "resumed", strategy="fsdp", ckpt_path="last")
    saved = load(str(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt"))
    assert os.path.isfile(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")  # DDP wrote a file
    for name, value in saved["state_dict"].items():
        assert torch.equal(resumed[0]["start"][name], value), name
    assert (tmp_path / "checkpoints" / "epoch=1-step=12.ckpt").is_dir()  # FSDP went on with directories
    assert resumed[0]["step"] == 12


@pytest.mark.timeout(600)
def test_full_state_dict_type_writes_one_file_that_resumes(tmp_path, full_fsdp):
    full_root, _ = full_fsdp
    run(2, tmp_path, tmp_path / "crash", crash_at=5, state_dict_type="full")
    assert (tmp_path / "checkpoints" / "epoch=0-step=4.ckpt").is_file()
    run(2, tmp_path, tmp_path / "resumed", ckpt_path="last", state_dict_type="full")
    expected, got = final_weights(full_root), final_weights(tmp_path)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def _crash_in_save(rank, world_size, root):
    """Global rank zero dies (SIGKILL-like) while step 6's checkpoint is being written."""
    import distloop.checkpoint as checkpoint

    real = checkpoint.write_atomic

    def dying(state, path):
        if "step=6" in path:
            os._exit(9)  # its shards are on disk, its run.pt is not
        real(state, path)

    checkpoint.write_atomic = dying
    from distloop import ModelCheckpoint, Trainer
    trainer = Trainer(strategy=_strategy("fsdp"), max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accumulate_grad_batches=2, default_root_dir=root,
                      callbacks=[ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=2,
                                                 save_last=True)])
    from resume_helpers import loaders
    trainer.fit(Net(), *loaders())


@pytest.mark.timeout(300)
def test_a_crash_during_an_async_save_leaves_the_previous_checkpoint_last(tmp_path):
    with pytest.raises(Exception):
        spawn(_crash_in_save, 2, str(tmp_path), init=False, timeout=120)
    directory = tmp_path / "checkpoints"
    assert os.readlink(directory / LAST) == "epoch=0-step=4.ckpt"
    assert not (directory / "epoch=0-step=6.ckpt").exists()
    assert (directory / ".epoch=0-step=6.ckpt.partial").is_dir()  # hidden, never renamed into place
    assert newest_valid([str(directory)])[0] == str(directory / "epoch=0-step=4.ckpt")
    assert load(str(directory / LAST))["global_step"] == 4


@pytest.mark.timeout(300)
def test_consolidate_writes_one_file_a_plain_module_loads(tmp_path, full_fsdp):
    full_root, _ = full_fsdp
    src = full_root / "checkpoints" / "epoch=0-step=4.ckpt"
    dst = tmp_path / "model.pt"
    done = subprocess.run([sys.executable, "-m", "distloop", "consolidate", str(src), str(dst)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = torch.load(dst, weights_only=True)
    assert "optimizer_states" not in state and "loops" not in state
    plain = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2)).eval()
    plain.load_state_dict({k.removeprefix("net."): v for k, v in state["state_dict"].items()})
    restored = Net.load_from_checkpoint(str(src)).eval()  # a directory loads like a file
    x = torch.randn(5, 6)
    assert torch.equal(plain(x), restored.net(x))
    consolidate(str(src), str(tmp_path / "with-optimizer.pt"), optimizer=True)
    with_optimizer = torch.load(tmp_path / "with-optimizer.pt", weights_only=True)
    assert len(with_optimizer["optimizer_states"]) == 1
    assert with_optimizer["optimizer_states"][0]["state"][0]["exp_avg"].shape == (32, 6)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        consolidate(str(dst), str(tmp_path / "again.pt"), optimizer=True)
    link = tmp_path / "link.pt"
    link.symlink_to(dst)
    same = subprocess.run([sys.executable, "-m", "distloop", "consolidate", str(link), str(dst)],
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 2 and "must differ" in same.stderr


def test_consolidate_of_a_missing_checkpoint_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distloop", "consolidate", str(tmp_path / "nope.ckpt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "No checkpoint at" in done.stderr
    assert not (tmp_path / "out.pt").exists()


def _fail_to_start_a_save(rank, world_size, root):
    """Rank zero cannot make the second save's directory: every rank must stop with an error."""
    import errno

    import distloop.checkpoint as checkpoint
    from distloop import ModelCheckpoint, Trainer
    from distloop.checkpoint import CheckpointError
    from resume_helpers import loaders

    real, calls = checkpoint._remove_leftovers, []

    def failing(directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.EACCES, "Permission denied", directory)
        real(directory)

    checkpoint._remove_leftovers = failing  # only rank zero prepares the directory
    trainer = Trainer(strategy=_strategy("fsdp"), max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accumulate_grad_batches=2, default_root_dir=root,
                      callbacks=[ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=2,
                                                 save_top_k=-1)])
    try:
        trainer.fit(Net(), *loaders())
        outcome = "trained on"
    except CheckpointError as err:
        outcome = str(err)
    torch.save({"outcome": outcome, "step": trainer.global_step}, f"{root}/rank{rank}.pt")


@pytest.mark.timeout(300)
def test_a_rank_that_cannot_start_an_async_save_stops_every_rank_with_its_error(tmp_path):
    spawn(_fail_to_start_a_save, 2, str(tmp_path), init=False, timeout=100)  # no waiting for a timeout
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert "Permission denied" in zero["outcome"] and "epoch=0-step=4.ckpt" in zero["outcome"]
    assert "could not write sharded checkpoint" in one["outcome"].lower()
    assert zero["step"] == one["step"] < 12  # both stopped, together, soon after the failed save
    assert not (tmp_path / "checkpoints" / "epoch=0-step=4.ckpt").exists()
    assert (tmp_path / "checkpoints" / "epoch=0-step=2.ckpt").is_dir()  # the saves before it are intact


class _Score(Net):
    """A monitored value that improves at step 8 only: the later saves write last.ckpt itself."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("score", torch.tensor(1.0 if self.trainer.global_step + 1 == 8 else 0.0), sync_dist=True)
        return loss


def _fit_with_save_last(rank, world_size, root):
    from distloop import ModelCheckpoint, Trainer
    from resume_helpers import loaders

    checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", monitor="score", mode="max", save_last=True,
                                 every_n_train_steps=4)
    trainer = Trainer(strategy=_strategy("fsdp"), max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root, callbacks=[checkpoint])
    trainer.fit(_Score(), *loaders())


@pytest.mark.timeout(300)
def test_last_can_be_a_directory_then_a_link_again(tmp_path):
    spawn(_fit_with_save_last, 2, str(tmp_path), init=False, timeout=120)
    directory = tmp_path / "checkpoints"
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["epoch=0-step=8.ckpt", LAST], names  # no leftovers of the replaced directories
    assert (directory / LAST).is_dir() and not (directory / LAST).is_symlink()  # the newest state itself
    assert load(str(directory / LAST))["global_step"] == 24


def test_a_sharded_checkpoint_missing_a_shard_is_skipped_and_named(tmp_path, full_fsdp):
    full_root, _ = full_fsdp
    good, bad = tmp_path / "epoch=0-step=4.ckpt", tmp_path / "epoch=0-step=6.ckpt"
    shutil.copytree(full_root / "checkpoints" / good.name, good)
    shutil.copytree(full_root / "checkpoints" / bad.name, bad)
    os.utime(bad, (os.path.getmtime(good) + 10,) * 2)
    (bad / "__1_0.distcp").unlink()
    path, skipped = newest_valid([str(tmp_path)])
    assert path == str(good) and len(skipped) == 1 and "__1_0.distcp" in skipped[0]
    with pytest.raises(CheckpointError, match="do not load"):
        load(str(bad))
    done = subprocess.run([sys.executable, "-m", "distloop", "consolidate", str(bad), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and str(bad) in done.stderr and "Traceback" not in done.stderr
