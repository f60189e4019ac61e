"""Exact resume across ranks: 2 ranks, another world size, preemption, kills under torchrun."""

import csv
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from _commands import run as run_command
from _spawn import spawn
from distloop import Callback, Preempted
from distloop.checkpoint import load
from resume_helpers import CrashAt, fit

pytestmark = pytest.mark.distributed
TESTS = Path(__file__).parent


def _fit_rank(rank, world_size, root, out, crash_at, ckpt_path, extra, every):
    callbacks = [CrashAt(crash_at)] if crash_at else []
    if extra == "term-on-rank-1" and rank == 1:
        callbacks.append(TermAt(5))
    try:
        trainer, module = fit(root, *callbacks, ckpt_path=ckpt_path, strategy="ddp", max_epochs=2, every=every)
        result = {"step": trainer.global_step, "state": module.state_dict()}
    except Preempted as stop:
        result = {"preempted": stop.checkpoint_path, "code": stop.code}
        module = None
    seen = [] if module is None else module.seen
    torch.save({**result, "seen": seen}, f"{out}-rank{rank}.pt")


class TermAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and batch_idx % 2 == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def run(world_size, root, out, crash_at=0, ckpt_path=None, extra="", every=2):
    spawn(_fit_rank, world_size, str(root), str(out), crash_at, ckpt_path, extra, every, init=False, timeout=240)
    return [torch.load(f"{out}-rank{r}.pt", weights_only=True) for r in range(world_size)]


def ids_of_epoch(results, epoch):
    return sorted(i for r in results for e, _, ids in r["seen"] if e == epoch for i in ids)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("full2")
    return run(2, root, root / "out")


@pytest.mark.timeout(600)
def test_two_ranks_crash_and_resume_bitwise(tmp_path, two_rank_run):
    crashed = run(2, tmp_path, tmp_path / "crash", crash_at=5)  # the last checkpoint is step 4's
    resumed = run(2, tmp_path, tmp_path / "resumed", ckpt_path="last")
    assert resumed[0]["step"] == two_rank_run[0]["step"] == 12
    for name, value in two_rank_run[0]["state"].items():
        assert torch.equal(resumed[0]["state"][name], value), name
        assert torch.equal(resumed[1]["state"][name], value), name
    # Within the interrupted epoch: before the checkpoint (4 steps x 2 batches) plus after it.
    before = sorted(i for r in crashed for e, b, ids in r["seen"] if e == 0 and b < 8 for i in ids)
    after = ids_of_epoch(resumed, 0)
    assert sorted(before + after) == list(range(96))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_world_size_uses_every_sample_once(tmp_path, new_world):
    # A step is 2 ranks x 2 batches x 4 samples: the checkpoint at step 3 has seen 48 of 96
    # samples, and the other 48 split evenly over 1 or 3 ranks (no padding repeats one).
    crashed = run(2, tmp_path, tmp_path / "crash", crash_at=4, every=3)
    resumed = run(new_world, tmp_path, tmp_path / "resumed", ckpt_path="last", every=3)
    before = sorted(i for r in crashed for e, b, ids in r["seen"] if e == 0 and b < 6 for i in ids)
    after = ids_of_epoch(resumed, 0)
    assert len(before) == 48
    assert sorted(before + after) == list(range(96))  # each sample of the epoch exactly once
    assert all(r["step"] == resumed[0]["step"] for r in resumed)


@pytest.mark.timeout(600)
def test_sigterm_on_one_rank_stops_every_rank_then_resumes_bitwise(tmp_path, two_rank_run):
    stopped = run(2, tmp_path, tmp_path / "term", extra="term-on-rank-1")
    assert [r["code"] for r in stopped] == [75, 75]
    assert stopped[0]["preempted"] == stopped[1]["preempted"]
    state = load(stopped[0]["preempted"])
    assert state["global_step"] == 6  # agreed at the next metrics read (every 3 batches), then the next step
    resumed = run(2, tmp_path, tmp_path / "resumed", ckpt_path="last")
    for name, value in two_rank_run[0]["state"].items():
        assert torch.equal(resumed[0]["state"][name], value), name


def _save_on_rank_zero_only(rank, world_size, root):
    class SaveOnZero(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 1 and trainer.is_global_zero:
                trainer.save_checkpoint(f"{root}/only-zero.ckpt")

    from distloop import Trainer
    from distloop.strategies import DDPStrategy
    from resume_helpers import Net, loaders

    trainer = Trainer(strategy=DDPStrategy(accelerator="cpu", timeout_s=5), callbacks=[SaveOnZero()],
                      logger=False, enable_progress_bar=False, max_epochs=1)
    with pytest.raises(RuntimeError) as err:
        trainer.fit(Net(), *loaders())
    if rank == 0:
        assert "every rank must call it" in str(err.value)
        assert "is_global_zero" in str(err.value)


@pytest.mark.timeout(180)
def test_save_checkpoint_on_one_rank_is_a_clear_error(tmp_path):
    spawn(_save_on_rank_zero_only, 2, str(tmp_path), init=False, timeout=120)
    assert not (tmp_path / "only-zero.ckpt").exists()


def distloop_run(run_dir, *overrides, strategy="ddp"):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return run_command(
        [sys.executable, "-m", "distloop", f"hydra.run.dir={run_dir}", "launcher.nproc_per_node=2", f"strategy={strategy}",
         "trainer.max_epochs=2", "trainer.deterministic=true", "test_after_fit=false", "callbacks=checkpoint",
         "callbacks.checkpoint.every_n_epochs=null", "+callbacks.checkpoint.every_n_train_steps=4",
         "callbacks.checkpoint.save_top_k=-1", *overrides], 400, env=env, cwd=run_dir.parent)


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_killed_under_torchrun_restarts_and_resumes_bitwise(tmp_path, strategy):
    full = distloop_run(tmp_path / "full", strategy=strategy)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = distloop_run(tmp_path / "killed", "launcher.max_restarts=1",
                          "+callbacks.kill._target_=failing_modules.KillAt", "+callbacks.kill.rank=1",
                          "+callbacks.kill.step=10", strategy=strategy)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resumed from" in killed.stderr and "step=8.ckpt" in killed.stderr
    final = "epoch=1-step=20.ckpt"
    assert (tmp_path / "killed" / "checkpoints" / final).is_dir() == (strategy == "fsdp")  # FSDP: shards
    a = load(str(tmp_path / "full" / "checkpoints" / final))
    b = load(str(tmp_path / "killed" / "checkpoints" / final))
    for name, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], value), name
    with open(tmp_path / "killed" / "metrics.csv") as f:
        epochs = [r for r in csv.DictReader(f) if r.get("train_loss_epoch")]
    with open(tmp_path / "full" / "metrics.csv") as f:
        full_epochs = [r for r in csv.DictReader(f) if r.get("train_loss_epoch")]
    assert [r["train_loss_epoch"] for r in epochs][-1] == [r["train_loss_epoch"] for r in full_epochs][-1]
