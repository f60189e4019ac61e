"""The loop cookbook (examples/loops/): each recipe on 1 process and on 2 gloo ranks gives the same
result, and a rank SIGKILLed in the middle of the recipe's own state, restarted by torchrun,
ends bitwise equal to the uninterrupted 2-rank run. One torchrun job runs every recipe's two
runs (tests/cookbook_run.py), killing one recipe per attempt."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from _commands import run

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "examples" / "loops"
# recipe -> the training batch after which rank 1 is killed (inside the recipe's own state)
KILL_AT = {
    "active_learning": 11,    # in round 2 of 3 (its fit: batches 7-15), resumed at that fit's step 4
    "alternating_tasks": 20,  # in the second task's epoch (2), resumed at step 18 of its own loader
    "custom_hook": 11,        # mid-epoch, after the checkpoint at step 9: the counter resumes from it
    "full_batch_lbfgs": 3,    # between two L-BFGS epochs (an epoch is one batch)
    "kfold": 45,              # in fold 2 of 3 (fold 1 stops early after 16 batches), mid-epoch
    "resume_at_validation": 9,  # right after the checkpoint at step 8, a validation boundary
    "validation_guided": 13,  # mid-epoch 2, resumed at step 12 with its halved learning rate and last loss
    "yielding_gan": 5,        # mid-epoch (2 steps a batch), after the checkpoint at step 8
}


def recipe(name: str) -> Any:
    sys.path.insert(0, str(RECIPES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(RECIPES))


def compare(a: Any, b: Any, exact: bool, where: str = "result") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            compare(a[key], b[key], exact, f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, exact, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3, msg=where)  # float sums in another order
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every recipe's uninterrupted and killed runs on 2 ranks, in one torchrun job."""
    root = tmp_path_factory.mktemp("cookbook")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_"))}
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                  f"--max-restarts={len(KILL_AT)}", str(HERE / "cookbook_run.py"), str(root),
                  *(f"{name}:{step}" for name, step in KILL_AT.items())], 60 + 60 * len(KILL_AT), env=env, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("distloop: resumed from") == len(KILL_AT), result.stderr[-4000:]
    return root


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(KILL_AT))
def test_recipe_runs_on_one_and_two_ranks_and_resumes_exactly_after_a_kill(name, two_ranks, tmp_path):
    ref = torch.load(two_ranks / name / "ref" / "result.pt", weights_only=True)
    killed = torch.load(two_ranks / name / "killed" / "result.pt", weights_only=True)
    compare(killed, ref, exact=True)
    if "manual_weights" in ref:  # the yielding GAN trains what its manual-optimization twin trains
        compare(ref["weights"], ref["manual_weights"], exact=True)
    compare(recipe(name).main(str(tmp_path)), ref, exact=False)  # 1 process: the same up to float sums
