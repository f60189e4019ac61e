"""Timer: a wall-clock budget for training; when it is spent, save a checkpoint and stop.

As Lightning's: the time spent in training, validation and testing, ``duration`` as
``"DD:HH:MM:SS"``, a ``timedelta`` or a dict of ``timedelta`` arguments, checked every step
or every epoch (``interval``), and the training time carried in the checkpoint, so a resumed
run spends only what is left. Two things differ. The ranks agree through the control plane
(the request rides on the next metrics read) instead of a broadcast at every step, so a
budget costs no collective; the run stops at the first step every rank reaches after any
rank's clock ran out. And before stopping it saves ``timer-step=N.ckpt`` next to the other
checkpoints, so ``ckpt_path="last"`` (or the command's ``resume=auto``) continues exactly
from where the budget ran out.
"""

from __future__ import annotations

import os
import re
import sys
import time
from datetime import timedelta
from typing import Any

from distloop.callbacks.callback import Callback
from distloop.control import Request
from distloop.errors import MisconfigurationError
from distloop.stages import RunningStage

_STAGES = (RunningStage.TRAINING, RunningStage.VALIDATING, RunningStage.TESTING)


class Timer(Callback):
    """Stop training after ``duration`` (``None``: only measure); ``interval`` "step" or "epoch"."""

    def __init__(self, duration: str | timedelta | dict[str, int] | None = None, interval: str = "step",
                 verbose: bool = True) -> None:
        if isinstance(duration, str):
            match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", duration.strip())
            if not match:
                raise MisconfigurationError(f"`Timer(duration={duration!r})` is not a valid duration. "
                                            "Expected a string in the format DD:HH:MM:SS.")
            days, hours, minutes, seconds = (int(g) for g in match.groups())
            duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        elif isinstance(duration, dict):
            duration = timedelta(**duration)
        if interval not in ("step", "epoch"):
            raise MisconfigurationError(f"Unsupported parameter value `Timer(interval={interval})`. Possible choices "
                                        "are: step, epoch")
        self._duration = duration.total_seconds() if duration is not None else None
        self._interval = interval
        self._verbose = verbose
        self._start: dict[RunningStage, float | None] = dict.fromkeys(_STAGES)
        self._end: dict[RunningStage, float | None] = dict.fromkeys(_STAGES)
        self._offset = 0.0  # training time of the run's earlier attempts (from the checkpoint)
        self._expired = False  # this rank's clock ran out during this fit

    # ------------------------------------------------------------ Lightning's queries
    def start_time(self, stage: str = RunningStage.TRAINING) -> float | None:
        return self._start[RunningStage(stage)]

    def end_time(self, stage: str = RunningStage.TRAINING) -> float | None:
        return self._end[RunningStage(stage)]

    def time_elapsed(self, stage: str = RunningStage.TRAINING) -> float:
        """Seconds spent in ``stage`` ("train" includes the earlier attempts of a resumed run)."""
        stage = RunningStage(stage)
        start, end = self._start[stage], self._end[stage]
        offset = self._offset if stage == RunningStage.TRAINING else 0.0
        if start is None:
            return offset
        return (time.monotonic() if end is None else end) - start + offset

    def time_remaining(self, stage: str = RunningStage.TRAINING) -> float | None:
        return None if self._duration is None else self._duration - self.time_elapsed(stage)

    # ------------------------------------------------------------ clocks
    def on_train_start(self, trainer: Any, module: Any) -> None:
        self._start[RunningStage.TRAINING], self._end[RunningStage.TRAINING] = time.monotonic(), None

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self._end[RunningStage.TRAINING] = time.monotonic()

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        self._start[RunningStage.VALIDATING], self._end[RunningStage.VALIDATING] = time.monotonic(), None

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        self._end[RunningStage.VALIDATING] = time.monotonic()

    def on_test_start(self, trainer: Any, module: Any) -> None:
        self._start[RunningStage.TESTING], self._end[RunningStage.TESTING] = time.monotonic(), None

    def on_test_end(self, trainer: Any, module: Any) -> None:
        self._end[RunningStage.TESTING] = time.monotonic()

    # ------------------------------------------------------------ the budget
    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self._expired = False
        if self._duration is not None and self.time_elapsed() >= self._duration:
            trainer.should_stop = True  # a checkpoint whose budget is spent already: nothing to train

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._interval == "step":
            self._check(trainer)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if self._interval == "epoch":
            self._check(trainer)

    def _check(self, trainer: Any) -> None:
        if self._duration is not None and not self._expired and self.time_elapsed() >= self._duration:
            self._expired = True
            trainer.should_stop = True
            trainer.control.request(Request.SAVE)  # agreed with the stop, at the same metrics read

    def on_resumable_point(self, trainer: Any, module: Any) -> None:
        """A save was agreed (with the stop): the ranks vote whether any budget ran out (a collective,
        only then), and all save."""
        if not trainer.control.decided(Request.SAVE) or self._duration is None:
            return
        if trainer.strategy.reduce_boolean_decision(self._expired, all=False):
            path = os.path.join(trainer.checkpoint_dirs()[0], f"timer-step={trainer.global_step}.ckpt")
            trainer.save_checkpoint(path)
            if self._verbose and trainer.is_global_zero:
                elapsed = timedelta(seconds=int(self.time_elapsed()))
                print(f"distloop: time limit reached ({elapsed} of training); saved {path}; stopping.",
                      file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": {stage.value: self.time_elapsed(stage) for stage in _STAGES}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = state_dict.get("time_elapsed", {}).get(RunningStage.TRAINING.value, 0.0)
