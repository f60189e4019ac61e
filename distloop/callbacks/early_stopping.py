"""EarlyStopping: stop when a monitored metric stops improving."""

from __future__ import annotations

import math
from typing import Any

from distloop.callbacks.callback import Callback
from distloop.errors import MisconfigurationError


class EarlyStopping(Callback):
    """Stops after ``patience`` checks without an improvement of more than ``min_delta``.

    Checks after each validation run, or after each training epoch when the run has no
    validation (or ``check_on_train_epoch_end=True``). Its state starts fresh at every
    ``fit`` and is saved in checkpoints.
    """

    may_set_should_stop = False  # it agrees on its decision itself

    def __init__(
        self,
        monitor: str,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_on_train_epoch_end: bool | None = None,
        strict: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise MisconfigurationError(f"EarlyStopping(mode={mode!r}): use 'min' or 'max'.")
        if patience < 0:
            raise MisconfigurationError(f"EarlyStopping(patience={patience}) must be >= 0.")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.strict = strict
        self._reset()

    def _reset(self) -> None:
        self.wait_count = 0
        self.best_score = math.inf if self.mode == "min" else -math.inf
        self.stopped_epoch = 0

    @property
    def state_key(self) -> str:
        return f"EarlyStopping{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "best_score": self.best_score, "stopped_epoch": self.stopped_epoch,
                "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.best_score = state_dict["best_score"]
        self.stopped_epoch = state_dict["stopped_epoch"]

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self._reset()

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        on_train = self.check_on_train_epoch_end
        if on_train is None:
            on_train = not trainer.has_validation
        if on_train:
            self._check(trainer)

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if trainer.sanity_checking or self.check_on_train_epoch_end:
            return
        if trainer.has_validation:
            self._check(trainer)

    def _check(self, trainer: Any) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if self.strict:
                raise MisconfigurationError(
                    f"EarlyStopping monitors {self.monitor!r}, which was not logged; logged: "
                    f"{sorted(trainer.callback_metrics)}. Log it with `self.log({self.monitor!r}, ...)` "
                    "or change `monitor`."
                )
            return
        score = float(value)
        improved = (score < self.best_score - self.min_delta) if self.mode == "min" else (
            score > self.best_score + self.min_delta)
        if improved:
            self.best_score = score
            self.wait_count = 0
        else:
            self.wait_count += 1
        should_stop = not math.isfinite(score) or self.wait_count >= self.patience
        # Every rank must agree, or one would stop while another waits in a collective.
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            trainer.stop()  # agreed just above
