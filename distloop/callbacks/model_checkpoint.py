"""ModelCheckpoint: when to save, what to keep, and the ``last.ckpt`` link.

Hooks only note that a save is due; the save happens at the next point a run can be
resumed from exactly (``on_resumable_point``: after a whole optimizer step and any
validation it triggered, or after a whole epoch), so a resumed run never repeats or
skips a hook. Saving is a collective; the decision is the same on every rank: step counts
are; monitored values are taken from rank zero; a clock that says a timed save is due is
a request (``Request.SAVE``) the ranks agree on at the next metrics read.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta
from typing import Any

from distloop.callbacks.callback import Callback
from distloop.checkpoint import LAST, SUFFIX, point_last
from distloop.control import Request
from distloop.errors import MisconfigurationError


class ModelCheckpoint(Callback):
    """Lightning's arguments: ``dirpath`` (default ``<default_root_dir>/checkpoints``),
    ``filename`` (a template such as ``"{epoch}-{step}-{val_loss:.3f}"``), ``monitor`` and
    ``mode`` (keep the ``save_top_k`` best; without ``monitor``, the ``save_top_k`` newest;
    -1 keeps all), ``save_last`` (keep ``last.ckpt`` pointing at the newest file), and when to
    save: ``every_n_train_steps``, ``every_n_epochs`` (default 1 when no trigger is given) or
    ``train_time_interval``.
    """

    may_set_should_stop = False

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = False,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | float | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise MisconfigurationError(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if save_top_k < -1:
            raise MisconfigurationError(f"ModelCheckpoint(save_top_k={save_top_k}) must be >= -1.")
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 0:
                raise MisconfigurationError(f"ModelCheckpoint({name}={value}) must be >= 0.")
        if sum(x is not None for x in (every_n_train_steps, every_n_epochs, train_time_interval)) > 1:
            raise MisconfigurationError("ModelCheckpoint: give one of every_n_train_steps, every_n_epochs, "
                                        "train_time_interval.")
        if isinstance(train_time_interval, timedelta):
            train_time_interval = train_time_interval.total_seconds()
        if every_n_train_steps is None and train_time_interval is None and every_n_epochs is None:
            every_n_epochs = 1
        self.dirpath = dirpath
        self.filename = filename or ("{epoch}-{step}" + ("-{" + monitor + "}" if monitor else ""))
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs or 0
        self.train_time_interval = train_time_interval
        self.kept: list[tuple[float, str]] = []  # (score, path); newest first when there is no monitor
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._due = False
        self._last_only: str | None = None  # a file saved only so that last.ckpt has a target
        self._last_step_saved = -1
        self._last_time = time.monotonic()

    @property
    def state_key(self) -> str:
        return f"ModelCheckpoint{{'monitor': {self.monitor!r}, 'mode': {self.mode!r}, 'dirpath': {self.dirpath!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"kept": [[score, path] for score, path in self.kept], "best_model_path": self.best_model_path,
                "best_model_score": self.best_model_score, "last_model_path": self.last_model_path,
                "last_step_saved": self._last_step_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kept = [(score, path) for score, path in state_dict["kept"] if os.path.exists(path)]
        self.best_model_path = state_dict["best_model_path"]
        self.best_model_score = state_dict["best_model_score"]
        self.last_model_path = state_dict["last_model_path"]
        self._last_step_saved = state_dict["last_step_saved"]

    # ---------------------------------------------------------------- hooks: note what is due
    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self._due = False
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0 and trainer.global_step != self._last_step_saved:
            self._due = True
        if self._clock_due():
            trainer.control.request(Request.SAVE)  # this rank's clock: the ranks agree before anyone saves

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking and self._epoch_due(trainer):
            self._due = True

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if not trainer.has_validation and self._epoch_due(trainer):
            self._due = True

    def _epoch_due(self, trainer: Any) -> bool:
        return bool(self.every_n_epochs) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ---------------------------------------------------------------- saving, at a resumable point
    def _clock_due(self) -> bool:
        interval = self.train_time_interval
        return interval is not None and time.monotonic() - self._last_time >= interval

    def on_resumable_point(self, trainer: Any, module: Any) -> None:
        if self.train_time_interval is not None and trainer.control.decided(Request.SAVE):
            # Some rank's clock of some timed checkpoint asked; this one saves if rank zero's
            # own clock says so (a collective, only when a timed save was agreed).
            if trainer.strategy.reduce_boolean_decision(trainer.is_global_zero and self._clock_due(), all=False):
                self._due = True
        if not self._due or trainer.global_step == self._last_step_saved:
            self._due = False
            return
        self._due = False
        score = self._score(trainer)
        if self.monitor is None:
            keep = self.save_top_k != 0 or self.save_last  # the same on every rank
        else:  # rank zero's values decide, so every rank takes part in the same saves
            keep = trainer.strategy.reduce_boolean_decision(trainer.is_global_zero and self._would_keep(score),
                                                            all=False)
        if not keep:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        path = os.path.join(self.dirpath, self._format(trainer.current_epoch, trainer.global_step, metrics))
        self._last_step_saved = trainer.global_step
        self._last_time = time.monotonic()
        then = None
        if trainer.is_global_zero:
            stale = self._record(score, path)
            then = lambda written: self._written(written, stale)  # noqa: E731
        trainer.save_checkpoint(path, blocking=False, then=then)

    def _score(self, trainer: Any) -> float:
        if self.monitor is None:
            return float(trainer.global_step)
        if self.monitor not in trainer.callback_metrics:
            raise MisconfigurationError(
                f"ModelCheckpoint monitors {self.monitor!r}, which was not logged; logged: "
                f"{sorted(trainer.callback_metrics)}. Log it, or change `monitor`.")
        return float(trainer.callback_metrics[self.monitor])

    def _better(self, a: float, b: float) -> bool:
        if self.monitor is None or self.mode == "max":
            return a > b
        return a < b

    def _would_keep(self, score: float) -> bool:
        if self.save_top_k == 0:
            return self.save_last
        if self.save_top_k == -1 or len(self.kept) < self.save_top_k:
            return True
        return self.save_last or self._better(score, self.kept[-1][0])

    def _record(self, score: float, path: str) -> list[str]:
        """Rank zero's bookkeeping: which files to keep; returns those to delete once ``path`` is written."""
        if self.save_top_k == 0:  # only last.ckpt is wanted: keep just the newest file
            stale, self.kept = [p for _, p in self.kept], [(score, path)]
        else:
            ranked = sorted(self.kept + [(score, path)], key=lambda sp: sp[0],
                            reverse=self.monitor is None or self.mode == "max")
            limit = len(ranked) if self.save_top_k == -1 else self.save_top_k
            if any(p == path for _, p in ranked[:limit]):
                stale, self.kept = [p for _, p in ranked[limit:]], ranked[:limit]
                stale += [self._last_only] if self._last_only else []
                self._last_only = None
            else:  # not among the best: written only so that last.ckpt has the newest state
                stale = [self._last_only] if self._last_only else []
                self._last_only = path
        best_score, self.best_model_path = self.kept[0]
        self.best_model_score = best_score if self.monitor is not None else None
        self.last_model_path = path
        return stale

    def _written(self, path: str, stale: list[str]) -> None:
        """On the writer thread, once ``path`` is complete: move ``last`` to it, then drop stale files."""
        if self.save_last:
            point_last(os.path.dirname(path), path)
        for old in stale:
            if old != path and os.path.exists(old):
                os.remove(old)

    def _format(self, epoch: int, step: int, metrics: dict[str, float]) -> str:
        values = {"epoch": epoch, "step": step, **metrics}

        def field(match: re.Match) -> str:
            name, spec = match.group(1), match.group(2) or ""
            if name not in values:
                raise MisconfigurationError(f"ModelCheckpoint filename uses {{{name}}}, which was not logged; "
                                            f"logged: {sorted(metrics)}.")
            return f"{name}={format(values[name], spec.lstrip(':'))}"

        name = re.sub(r"\{([^{}:]+)(:[^{}]*)?\}", field, self.filename)
        if name + SUFFIX == LAST:
            raise MisconfigurationError("ModelCheckpoint filename 'last' is reserved for the last.ckpt link.")
        return name + SUFFIX
