"""Runs every kind of training data (tests/data_kinds.py) under torchrun, writing each rank's result
to ``ROOT/KIND/RUN/result-rank<R>.pt``. Modes:

- ``kill KIND:ATTEMPT:STEP ...``: per kind an uninterrupted run (``ref``) and one (``killed``) whose last
  rank is SIGKILLed after global step STEP on torchrun attempt ATTEMPT (one job, ``--max-restarts``);
- ``stop STEPS``: per kind a run (``moved``) that stops after STEPS steps, mid-epoch;
- ``resume``: per kind, the ``moved`` run resumed to its end (on another world size); a refusal is
  the result.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from data_kinds import KINDS, fit
from distloop import Callback, CheckpointError


class KillOnAttempt(Callback):
    def __init__(self, attempt: int, step: int) -> None:
        self.attempt, self.step = attempt, step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        this_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == self.attempt
        if this_attempt and trainer.global_rank == trainer.world_size - 1 and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def once(run_dir: Path, make: Any) -> None:
    """``make()``'s result saved for this rank, unless an earlier attempt saved it."""
    path = run_dir / f"result-rank{os.environ.get('RANK', '0')}.pt"
    if not path.exists():
        result = make()
        torch.save(result, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)


def main(root: Path, mode: str, args: list[str]) -> None:
    kills: dict[str, list[KillOnAttempt]] = {}
    if mode == "kill":
        for arg in args:
            kind, attempt, step = arg.split(":")
            kills.setdefault(kind, []).append(KillOnAttempt(int(attempt), int(step)))
    for kind in KINDS:
        if mode == "kill" and kind in kills:
            once(root / kind / "ref", lambda: fit(kind, str(root / kind / "ref")))
            once(root / kind / "killed", lambda: fit(kind, str(root / kind / "killed"), callbacks=kills[kind]))
        elif mode == "stop":
            once(root / kind / "moved", lambda: fit(kind, str(root / kind / "moved"), max_steps=int(args[0])))
        elif mode == "resume":
            def resume() -> dict:
                try:
                    return fit(kind, str(root / kind / "moved"))
                except CheckpointError as err:
                    return {"refused": str(err)}

            (root / kind / "moved" / f"result-rank{os.environ.get('RANK', '0')}.pt").unlink(missing_ok=True)
            once(root / kind / "moved", resume)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
