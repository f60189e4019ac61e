"""Runs loop-cookbook recipes under torchrun: for each, an uninterrupted run (``ROOT/NAME/ref``),
then a run (``ROOT/NAME/killed``) in which global rank 1 is SIGKILLed after its ``KILL_AFTER``-th training batch;
torchrun restarts the job and the recipe resumes. The i-th recipe is killed on attempt i, so one
job with ``--max-restarts=len(recipes)`` tests them all. Global rank zero saves each run's
result as ``result.pt``; a recipe whose results are there is not run again."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "loops"))

from distloop import Callback  # noqa: E402


class KillOnAttempt(Callback):
    """SIGKILLs global rank 1 after its ``batches``-th training batch (counted over every ``fit`` of
    the recipe: a K-fold recipe fits once per fold), on torchrun attempt ``attempt`` only."""

    def __init__(self, attempt: int, batches: int) -> None:
        self.attempt, self.batches, self.seen = attempt, batches, 0

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.seen += 1
        this_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == self.attempt
        if this_attempt and trainer.global_rank == 1 and self.seen == self.batches:
            os.kill(os.getpid(), signal.SIGKILL)


def save(result: dict, path: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)


def main(root: Path, recipes: list[tuple[str, int]]) -> None:
    for attempt, (name, kill_after) in enumerate(recipes):
        recipe = importlib.import_module(name)
        ref, killed = root / name / "ref", root / name / "killed"
        if not (ref / "result.pt").exists():
            save(recipe.main(str(ref)), ref / "result.pt")
        if not (killed / "result.pt").exists():
            save(recipe.main(str(killed), callbacks=[KillOnAttempt(attempt, kill_after)]), killed / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [(arg.split(":")[0], int(arg.split(":")[1])) for arg in sys.argv[2:]])
