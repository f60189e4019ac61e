"""Exact resume for every kind of training data (tests/data_kinds.py): a rank SIGKILLed mid-epoch under
``torchrun --max-restarts`` ends bitwise equal to an uninterrupted run, on 1 and 2 ranks (with worker
processes and random augmentation, and twice in one epoch); a run stopped mid-epoch on 2 ranks resumed
on 1 or 3 uses every sample of that epoch once, or is refused with a message where the kind keeps
its own per-rank position."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from _commands import run
from data_kinds import KINDS, N, SAME_WORLD_SIZE_ONLY

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


def torchrun(root: Path, nproc: int, *args: str, restarts: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                  f"--max-restarts={restarts}", str(HERE / "data_resume_run.py"), str(root), *args], 600, env=env,
                 cwd=root)
    assert result.returncode == 0, result.stderr[-5000:]
    return result.stderr


def results(run_dir: Path, world_size: int) -> list[dict]:
    return [torch.load(run_dir / f"result-rank{r}.pt", weights_only=False) for r in range(world_size)]


def kill_schedule(steps: list[int]) -> list[str]:
    """Each kind killed once, the first one twice in the same epoch: kind:attempt:step."""
    kinds = list(KINDS)
    schedule = [(kinds[0], steps[0]), (kinds[0], steps[1])] + [(kind, steps[0]) for kind in kinds[1:]]
    return [f"{kind}:{attempt}:{step}" for attempt, (kind, step) in enumerate(schedule)]


@pytest.fixture(scope="module", params=[1, 2], ids=["1-rank", "2-ranks"])
def killed_runs(request, tmp_path_factory) -> tuple[Path, int]:
    world_size = request.param
    steps = [9, 12] if world_size == 2 else [17, 24]  # mid-epoch 1 (7 or 14 steps an epoch), after a checkpoint
    root = tmp_path_factory.mktemp(f"kill{world_size}")
    schedule = kill_schedule(steps)
    stderr = torchrun(root, world_size, "kill", *schedule, restarts=len(schedule))
    assert stderr.count("distloop: resumed from") == len(schedule), stderr[-3000:]
    return root, world_size


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_kill_mid_epoch_resumes_bitwise(kind, killed_runs):
    root, world_size = killed_runs
    ref, killed = results(root / kind / "ref", world_size), results(root / kind / "killed", world_size)
    for a, b in zip(ref, killed):
        assert a["seen"] == b["seen"]  # the same samples, in the same order, on every rank
        for name in a["weights"]:
            assert torch.equal(a["weights"][name], b["weights"][name]), name
    assert killed[0]["before"] is not None  # it did resume
    ids = sorted(i for r in ref for epoch, batch in r["seen"] if epoch == 0 for i in batch)
    assert ids == list(range(N))  # each sample once in the first epoch


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """Every kind stopped after 4 of its 7 steps on 2 ranks: 32 of the epoch's 56 samples used."""
    root = tmp_path_factory.mktemp("moved")
    torchrun(root, 2, "stop", "4")
    return root


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_run_moved_to_another_world_size_uses_each_sample_of_the_epoch_once(world_size, stopped, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(stopped, root)
    torchrun(root, world_size, "resume")
    for kind in KINDS:
        after = results(root / kind / "moved", world_size)
        if kind in SAME_WORLD_SIZE_ONLY:
            assert all("on 2 ranks, and this run has" in r["refused"] for r in after), (kind, after[0])
            continue
        assert all("refused" not in r for r in after), (kind, after[0].get("refused"))
        before = after[0]["before"]  # every saved rank's record, as the checkpoint held it
        used = [i for rank in before for epoch, batch in rank if epoch == 0 for i in batch]
        used += [i for r in after for epoch, batch in r["seen"] if epoch == 0 for i in batch]
        assert sorted(used) == list(range(N)), kind
