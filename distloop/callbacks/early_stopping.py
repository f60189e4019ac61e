"""EarlyStopping: stop when a monitored metric stops improving, reaches a threshold or diverges."""

from __future__ import annotations

import sys
import warnings
from enum import Enum
from typing import Any, Callable

import torch
from torch import Tensor

from distloop.callbacks.callback import Callback
from distloop.errors import MisconfigurationError


class EarlyStoppingReason(Enum):
    """Why ``EarlyStopping`` stopped the run (``stopping_reason``)."""

    NOT_STOPPED = 0
    STOPPING_THRESHOLD = 1
    DIVERGENCE_THRESHOLD = 2
    PATIENCE_EXHAUSTED = 3
    NON_FINITE_METRIC = 4


class EarlyStopping(Callback):
    """Lightning's arguments and attributes (``wait_count``, ``stopped_epoch``, ``best_score``
    (a tensor), ``stopping_reason``, ``stopping_reason_message``).

    Checks at each training epoch's end when validation runs once an epoch (the default),
    else after each validation; ``check_on_train_epoch_end`` decides it. Any rank's stop
    stops every rank. Its state starts fresh at every ``fit`` (a second ``fit`` of the same
    Trainer is a new run) unless the fit resumes from a checkpoint, which holds it.
    """

    mode_dict = {"min": torch.lt, "max": torch.gt}
    order_dict = {"min": "<", "max": ">"}
    may_set_should_stop = False  # it agrees on its decision itself

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
    ) -> None:
        if mode not in self.mode_dict:
            raise MisconfigurationError(f"EarlyStopping(mode={mode!r}): `mode` can be 'min' or 'max'.")
        self.monitor = monitor
        self.patience = patience
        self.verbose = verbose
        self.mode = mode
        self.strict = strict
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.log_rank_zero_only = log_rank_zero_only
        self._check_on_train_epoch_end = check_on_train_epoch_end
        self._fitting = False
        # Signed as in Lightning: an improvement is `current - min_delta` beating the best score.
        self.min_delta = min_delta * (1 if self.monitor_op is torch.gt else -1)
        self._reset()

    def _reset(self) -> None:
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = torch.tensor(torch.inf if self.monitor_op is torch.lt else -torch.inf)
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None

    @property
    def monitor_op(self) -> Callable[[Tensor, Any], Tensor]:
        return self.mode_dict[self.mode]

    @property
    def state_key(self) -> str:
        key = {"monitor": self.monitor, "mode": self.mode}
        return f"{type(self).__qualname__}{key!r}"

    def state_dict(self) -> dict[str, Any]:
        return {"wait_count": self.wait_count, "stopped_epoch": self.stopped_epoch, "best_score": self.best_score,
                "patience": self.patience, "stopping_reason": self.stopping_reason.value,
                "stopping_reason_message": self.stopping_reason_message}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = state_dict["wait_count"]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self.best_score = torch.as_tensor(state_dict["best_score"])
        self.patience = state_dict["patience"]
        self.stopping_reason = EarlyStoppingReason(state_dict.get("stopping_reason", 0))
        self.stopping_reason_message = state_dict.get("stopping_reason_message")

    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        self._fitting = stage == "fit"
        if self._fitting:
            self._reset()  # before a checkpoint's state is loaded into it
        if self._check_on_train_epoch_end is None:
            # Validation more than once an epoch, or not every epoch: check after validation.
            self._check_on_train_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if self._check_on_train_epoch_end and not self._should_skip(trainer):
            self._run_early_stopping_check(trainer)

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if not self._check_on_train_epoch_end and not self._should_skip(trainer):
            self._run_early_stopping_check(trainer)

    def _should_skip(self, trainer: Any) -> bool:
        return not self._fitting or trainer.sanity_checking

    def _run_early_stopping_check(self, trainer: Any) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._monitor_logged(logs):
            return
        current = torch.as_tensor(logs[self.monitor]).squeeze()
        should_stop, reason = self._evaluate_stopping_criteria(current)
        # Every rank must agree, or one would stop while another waits in a collective.
        if trainer.strategy.reduce_boolean_decision(should_stop, all=False):
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
            trainer.stop()  # agreed just above
        if reason and self.verbose:
            self._log_info(trainer, reason)

    def _monitor_logged(self, logs: dict[str, Any]) -> bool:
        if self.monitor in logs:
            return True
        message = (f"Early stopping conditioned on metric `{self.monitor}` which is not available "
                   f"({self.monitor!r}, which was not logged). Pass in or modify your `EarlyStopping` callback to use "
                   f"any of the following: `{'`, `'.join(logs)}`")
        if self.strict:
            raise MisconfigurationError(message)
        if self.verbose:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return False

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        """Lightning's order: a non-finite value, the stopping threshold, divergence, then patience."""
        order = self.order_dict[self.mode]
        if self.check_finite and not torch.isfinite(current):
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            return True, (f"Monitored metric {self.monitor} = {current} is not finite. Previous best value was "
                          f"{self.best_score:.3f}. Signaling Trainer to stop.")
        if self.stopping_threshold is not None and self.monitor_op(current, self.stopping_threshold):
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            return True, (f"Stopping threshold reached: {self.monitor} = {current} {order} "
                          f"{self.stopping_threshold}. Signaling Trainer to stop.")
        if self.divergence_threshold is not None and self.monitor_op(-current, -self.divergence_threshold):
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            return True, (f"Divergence threshold reached: {self.monitor} = {current} {order} "
                          f"{self.divergence_threshold}. Signaling Trainer to stop.")
        if self.monitor_op(current - self.min_delta, self.best_score.to(current.device)):
            reason = self._improvement_message(current)
            self.best_score = current
            self.wait_count = 0
            return False, reason
        self.wait_count += 1
        if self.wait_count < self.patience:
            return False, None
        self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
        return True, (f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} records. "
                      f"Best score: {self.best_score:.3f}. Signaling Trainer to stop.")

    def _improvement_message(self, current: Tensor) -> str:
        if torch.isfinite(self.best_score):
            return (f"Metric {self.monitor} improved by {abs(self.best_score - current):.3f} >= "
                    f"min_delta = {abs(self.min_delta)}. New best score: {current:.3f}")
        return f"Metric {self.monitor} improved. New best score: {current:.3f}"

    def _log_info(self, trainer: Any, message: str) -> None:
        """Printed by every rank, prefixed with its rank (only rank zero with ``log_rank_zero_only``)."""
        rank = trainer.global_rank if trainer.world_size > 1 else None
        if rank is not None:
            message = f"[rank: {rank}] {message}"
        if rank is None or not self.log_rank_zero_only or rank == 0:
            print(message, file=sys.stderr, flush=True)
