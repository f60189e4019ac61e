"""ModelCheckpoint: Lightning's when to save, what to keep and how files are named, plus ``last.ckpt``.

Hooks only note that a save is due (with the metrics of that moment, which name the file);
the save happens at the next point a run can be resumed from exactly
(``on_resumable_point``: after a whole optimizer step and any validation it triggered, or
after a whole epoch), so a resumed run never repeats or skips a hook. Saving is a
collective, and so is the decision: global rank zero decides what a due save does (its
monitored value, the file name) and every rank takes that decision, so every rank keeps the
same ``best_model_path``, ``best_k_models`` and the rest; only rank zero writes and deletes
files. A clock that says a timed save is due is a request (``Request.SAVE``) the ranks
agree on at the next metrics read.
"""

from __future__ import annotations

import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal
from weakref import proxy

import torch
import yaml
from torch import Tensor

from distloop.callbacks.callback import Callback
from distloop.checkpoint import LAST, point_last, remove
from distloop.control import Request
from distloop.errors import MisconfigurationError

_FIELD = re.compile(r"\{([^{}:]*)(:[^{}]*)?\}")  # "{name}" or "{name:spec}" in a filename template


@dataclass
class _Due:
    """A save a hook asked for: the metrics of that moment, and what to save."""

    candidates: dict[str, Any]
    top_k: bool  # the top-k (or newest) file
    last: Literal["always", "if_saved"]  # last.ckpt: always, or only along with a top-k file


@dataclass
class _Decision:
    """Rank zero's decision for a due save, which every rank then carries out alike."""

    path: str | None = None  # the file to write for top-k; None: none
    score: Tensor | None = None  # its monitored value (rank zero's)
    last: bool = False  # whether last.ckpt follows this save
    note: str | None = None  # the verbose message
    error: str | None = None  # rank zero could not decide: every rank raises this


class ModelCheckpoint(Callback):
    """Lightning's arguments and attributes (``best_model_path``, ``best_model_score``,
    ``best_k_models``, ``kth_best_model_path``, ``kth_value``, ``last_model_path``).

    ``dirpath`` defaults to ``<default_root_dir>/checkpoints`` (not the logger's version
    directory: ``ckpt_path="last"`` in a restarted run must find the earlier attempt's
    files). ``save_last`` keeps ``dirpath/last.ckpt``: a link to the newest saved file, or,
    when a step or time trigger saved no top-k file, the newest state itself.
    """

    CHECKPOINT_JOIN_CHAR = "-"
    CHECKPOINT_EQUALS_CHAR = "="
    CHECKPOINT_NAME_LAST = "last"
    FILE_EXTENSION = ".ckpt"
    STARTING_VERSION = 1
    may_set_should_stop = False

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | float | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
    ) -> None:
        if save_on_exception:
            raise MisconfigurationError(
                "ModelCheckpoint(save_on_exception=True) is not supported: distloop saves only where a run can "
                "resume exactly. Use ckpt_path='last' to resume from the newest checkpoint, or a preemption "
                "signal (SIGTERM / SIGUSR1), which saves one and exits.")
        if mode not in ("min", "max"):
            raise MisconfigurationError(f"ModelCheckpoint(mode={mode!r}): `mode` can be 'min' or 'max'.")
        self.monitor = monitor
        self.verbose = verbose
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.auto_insert_metric_name = auto_insert_metric_name
        self.dirpath = os.path.realpath(os.path.expanduser(dirpath)) if dirpath else None
        self.filename = filename
        self._save_on_train_epoch_end = save_on_train_epoch_end
        self._enable_version_counter = enable_version_counter
        self._init_triggers(every_n_train_steps, every_n_epochs, train_time_interval)
        self._check_configuration()
        self.best_k_models: dict[str, Tensor] = {}
        self.kth_best_model_path = ""
        self.kth_value: Tensor = torch.tensor(torch.inf if mode == "min" else -torch.inf)
        self.best_model_path = ""
        self.best_model_score: Tensor | None = None
        self.current_score: Tensor | None = None
        self.last_model_path = ""
        self._last_global_step_saved = 0  # no save before the first step
        self._last_checkpoint_saved = ""
        self._defer_save_until_validation = False
        self._due: _Due | None = None
        self._fitting = False
        self._validated = False  # this fit has run validation: a missing monitor is then an error
        self._batch_epoch = 0  # the epoch of the latest training batch (names a timed save)
        self._last_time_checked = time.monotonic()

    def _init_triggers(self, every_n_train_steps: int | None, every_n_epochs: int | None,
                       train_time_interval: timedelta | float | None) -> None:
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_epochs = 1  # Lightning's default: at every epoch's end
        if isinstance(train_time_interval, (int, float)):
            train_time_interval = timedelta(seconds=train_time_interval)
        self._every_n_train_steps: int = every_n_train_steps or 0
        self._every_n_epochs: int = every_n_epochs or 0
        self._train_time_interval: timedelta | None = train_time_interval

    def _check_configuration(self) -> None:
        if self.save_top_k < -1:
            raise MisconfigurationError(f"Invalid value for save_top_k={self.save_top_k}. Must be >= -1")
        for name in ("every_n_train_steps", "every_n_epochs"):
            value = getattr(self, f"_{name}")
            if value < 0:
                raise MisconfigurationError(f"Invalid value for {name}={value}. Must be >= 0")
        triggers = (self._every_n_train_steps >= 1) + (self._every_n_epochs >= 1) + \
            (self._train_time_interval is not None)
        if triggers > 1:
            raise MisconfigurationError(
                f"Combination of parameters every_n_train_steps={self._every_n_train_steps}, "
                f"every_n_epochs={self._every_n_epochs} and train_time_interval={self._train_time_interval} "
                "should be mutually exclusive: give one of them.")
        if self.monitor is None and self.save_top_k not in (-1, 0, 1):
            raise MisconfigurationError(
                f"ModelCheckpoint(save_top_k={self.save_top_k}, monitor=None) is not a valid configuration: no "
                "quantity for top_k to track. Set `monitor`, or save_top_k to -1 (keep all), 0 or 1 (the newest).")

    @property
    def every_n_epochs(self) -> int:
        return self._every_n_epochs

    @property
    def state_key(self) -> str:
        key = {"monitor": self.monitor, "mode": self.mode, "every_n_train_steps": self._every_n_train_steps,
               "every_n_epochs": self._every_n_epochs, "train_time_interval": self._train_time_interval}
        return f"{type(self).__qualname__}{key!r}"

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best_model_score": self.best_model_score,
                "best_model_path": self.best_model_path, "current_score": self.current_score,
                "dirpath": self.dirpath, "best_k_models": self.best_k_models,
                "kth_best_model_path": self.kth_best_model_path, "kth_value": self.kth_value,
                "last_model_path": self.last_model_path, "last_global_step_saved": self._last_global_step_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath", self.dirpath)
        if saved_dir == self.dirpath:
            self.best_model_score = state_dict["best_model_score"]
            self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
            self.kth_value = state_dict.get("kth_value", self.kth_value)
            self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
            self.last_model_path = state_dict.get("last_model_path", self.last_model_path)
            self._last_global_step_saved = state_dict.get("last_global_step_saved", self._last_global_step_saved)
        else:
            warnings.warn(f"The dirpath has changed from {saved_dir!r} to {self.dirpath!r}, therefore "
                          "`best_model_score`, `kth_best_model_path`, `kth_value`, `last_model_path` and "
                          "`best_k_models` won't be reloaded. Only `best_model_path` will be reloaded.", stacklevel=2)
        self.best_model_path = state_dict["best_model_path"]

    # ---------------------------------------------------------------- names
    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None,
                               prefix: str | None = None) -> str:
        """The path for ``metrics``: ``"{epoch}-{val_loss:.2f}"`` -> ``dirpath/epoch=2-val_loss=0.12.ckpt``
        (without ``auto_insert_metric_name``: ``2-0.12``); a value not in ``metrics`` is 0; ``ver``
        appends ``-v{ver}``."""
        name = self._format_name(filename or self.filename, metrics, prefix)
        if ver is not None:
            name = self.CHECKPOINT_JOIN_CHAR.join((name, f"v{ver}"))
        name += self.FILE_EXTENSION
        return os.path.join(self.dirpath, name) if self.dirpath else name

    def _format_name(self, template: str | None, metrics: dict[str, Any], prefix: str | None) -> str:
        template = template or "{epoch}" + self.CHECKPOINT_JOIN_CHAR + "{step}"

        def field(match: re.Match) -> str:
            name, spec = match.group(1), (match.group(2) or ":")[1:]
            text = format(metrics.get(name, torch.tensor(0)), spec)  # a 0-d tensor formats as its value
            return f"{name}{self.CHECKPOINT_EQUALS_CHAR}{text}" if self.auto_insert_metric_name else text

        name = _FIELD.sub(field, template)
        return self.CHECKPOINT_JOIN_CHAR.join([prefix, name]) if prefix is not None else name

    def _monitor_candidates(self, trainer: Any, epoch: int | None = None) -> dict[str, Any]:
        """What file names and the monitor read: the logged values, and ``epoch`` and ``step`` now."""
        candidates = {k: v.detach().clone() if isinstance(v, Tensor) else v
                      for k, v in trainer.callback_metrics.items()}
        logged_epoch, logged_step = candidates.get("epoch"), candidates.get("step")
        candidates["epoch"] = logged_epoch.int() if isinstance(logged_epoch, Tensor) else torch.tensor(
            trainer.current_epoch if epoch is None else epoch)
        candidates["step"] = logged_step.int() if isinstance(logged_step, Tensor) else torch.tensor(trainer.global_step)
        return candidates

    # ---------------------------------------------------------------- hooks: note what is due
    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        if self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION != LAST:
            raise MisconfigurationError(f"ModelCheckpoint keeps the newest state in {LAST!r}, which "
                                        "ckpt_path='last' finds: CHECKPOINT_NAME_LAST cannot be changed.")
        self._fitting = stage == "fit"
        self._due = None
        self._validated = False
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        self.dirpath = trainer.strategy.broadcast(self.dirpath)
        if self._fitting and trainer.is_global_zero and self.save_top_k != 0 and os.path.isdir(self.dirpath) \
                and os.listdir(self.dirpath):
            warnings.warn(f"Checkpoint directory {self.dirpath} exists and is not empty.", stacklevel=2)

    def teardown(self, trainer: Any, module: Any, stage: str) -> None:
        self._fitting = False

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self._last_time_checked = time.monotonic()

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._every_n_train_steps < 1 and self._train_time_interval is None:
            return  # the default checkpoint: nothing to do per step
        self._batch_epoch = trainer.current_epoch
        if self._clock_due():
            trainer.control.request(Request.SAVE)  # this rank's clock: the ranks agree before anyone saves
        n = self._every_n_train_steps
        if n < 1 or trainer.global_step % n != 0:
            return
        if self.monitor is not None:  # a synced step value is read now (every rank is here), not up to an interval old
            trainer.sync_step_metric(self.monitor)
        self._step_or_time_due(trainer, self._monitor_candidates(trainer))

    def _step_or_time_due(self, trainer: Any, candidates: dict[str, Any]) -> None:
        """A step or time trigger fired: save now, or once validation has logged the monitored value."""
        if self.monitor is not None and (self.monitor not in candidates or self._validation_follows(trainer)):
            self._defer_save_until_validation = True
            return
        if not self._should_skip(trainer):
            self._due = _Due(candidates, top_k=True, last="always")

    def _validation_follows(self, trainer: Any) -> bool:
        """Whether this epoch's last batch is about to be validated (and the save waits for it)."""
        if self._should_save_on_train_epoch_end(trainer):
            return False
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or not trainer.has_validation:
            return False
        return (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch == 0

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if not self._should_skip(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._epoch_due(trainer)

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if self._fitting and not trainer.sanity_checking:
            self._validated = True
        if self._should_skip(trainer) or self._should_save_on_train_epoch_end(trainer):
            return
        if self._defer_save_until_validation:
            self._defer_save_until_validation = False
            self._due = _Due(self._monitor_candidates(trainer), top_k=True, last="always")
            return
        self._epoch_due(trainer)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        if self.save_last and not self._last_checkpoint_saved and not trainer.fast_dev_run:  # last.ckpt still is
            self._save(trainer, _Due(self._monitor_candidates(trainer), top_k=False, last="always"))

    def _epoch_due(self, trainer: Any) -> None:
        if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._due = _Due(self._monitor_candidates(trainer), top_k=True, last="if_saved")

    def _should_skip(self, trainer: Any) -> bool:
        return (not self._fitting or bool(trainer.fast_dev_run) or trainer.sanity_checking or self._due is not None
                or self._last_global_step_saved == trainer.global_step)

    def _should_save_on_train_epoch_end(self, trainer: Any) -> bool:
        if self._save_on_train_epoch_end is not None:
            return self._save_on_train_epoch_end
        if trainer.check_val_every_n_epoch != 1:
            return False
        if not trainer.has_validation:
            return True
        return trainer.val_check_interval == 1.0

    def _clock_due(self) -> bool:
        interval = self._train_time_interval
        return interval is not None and time.monotonic() - self._last_time_checked >= interval.total_seconds()

    # ---------------------------------------------------------------- saving, at a resumable point
    def on_resumable_point(self, trainer: Any, module: Any) -> None:
        if self._train_time_interval is not None and trainer.control.decided(Request.SAVE):
            # Some rank's clock of some timed checkpoint asked; this one saves if rank zero's
            # own clock says so (a collective, only when a timed save was agreed).
            if trainer.strategy.reduce_boolean_decision(trainer.is_global_zero and self._clock_due(), all=False):
                self._last_time_checked = time.monotonic()
                self._step_or_time_due(trainer, self._monitor_candidates(trainer, self._batch_epoch))
        due, self._due = self._due, None
        if due is not None and trainer.global_step != self._last_global_step_saved:
            self._save(trainer, due)

    def _save(self, trainer: Any, due: _Due) -> None:
        """Rank zero decides, every rank records the decision, then every rank takes part in the save."""
        decision = self._decide(trainer, due) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            decision = trainer.strategy.broadcast(decision)
        assert decision is not None
        if decision.error is not None:
            raise MisconfigurationError(decision.error)
        if decision.path is None and not decision.last:
            self._say(trainer, decision.note)
            return
        stale = self._record(trainer, decision, due.candidates)
        self._say(trainer, decision.note)
        self._write(trainer, decision, stale)

    @staticmethod
    def _say(trainer: Any, note: str | None) -> None:
        if note and trainer.is_global_zero:
            print(note, file=sys.stderr, flush=True)

    def _decide(self, trainer: Any, due: _Due) -> _Decision:
        try:
            decision = self._top_k_decision(trainer, due.candidates) if due.top_k and self.save_top_k != 0 \
                else _Decision()
        except MisconfigurationError as err:
            return _Decision(error=str(err))
        except (ValueError, TypeError) as err:  # a format spec that does not fit the value
            return _Decision(error=f"ModelCheckpoint could not name a file from filename={self.filename!r}: {err}")
        decision.last = bool(self.save_last) and (due.last == "always" or decision.path is not None)
        return decision

    def _top_k_decision(self, trainer: Any, candidates: dict[str, Any]) -> _Decision:
        if self.monitor is None:
            return _Decision(path=self._free_path(candidates, self.best_model_path))
        current = candidates.get(self.monitor)
        if current is None:
            message = (f"`ModelCheckpoint(monitor={self.monitor!r})` could not find the monitored key in the "
                       f"returned metrics: {list(candidates)}. HINT: Did you call `log({self.monitor!r}, value)` "
                       "in the `LoopModule`?")
            if self._validated:
                raise MisconfigurationError(message)
            warnings.warn(message, stacklevel=2)
        current = torch.as_tensor(current).detach().cpu() if current is not None else None
        if current is None or not self._is_top_k(current):
            note = (f"Epoch {candidates['epoch']:d}, global step {candidates['step']:d}: {self.monitor!r} was not in "
                    f"top {self.save_top_k}") if self.verbose else None
            return _Decision(note=note)
        full = self.save_top_k != -1 and len(self.best_k_models) == self.save_top_k
        path = self._free_path(candidates, self.kth_best_model_path if full else None)
        return _Decision(path=path, score=current)

    def _is_top_k(self, current: Tensor) -> bool:
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        better = torch.lt if self.mode == "min" else torch.gt
        return bool(better(current, self.best_k_models[self.kth_best_model_path]))

    def _free_path(self, candidates: dict[str, Any], replaceable: str | None) -> str:
        """The file name for ``candidates``; with the version counter, ``-v1``, ``-v2``... while
        that name is taken by a file other than ``replaceable`` (the one this save replaces)."""
        path = self.format_checkpoint_name(candidates)
        if os.path.basename(path) == LAST:
            raise MisconfigurationError(f"ModelCheckpoint filename {self.filename!r} gives {LAST!r}, which is "
                                        "reserved for the newest state: choose another filename.")
        version = self.STARTING_VERSION
        while self._enable_version_counter and os.path.exists(path) and path != replaceable:
            path = self.format_checkpoint_name(candidates, ver=version)
            version += 1
        return path

    def _record(self, trainer: Any, decision: _Decision, candidates: dict[str, Any]) -> list[str]:
        """Every rank's bookkeeping of a decided save; returns the files it makes stale."""
        stale: list[str] = []
        if decision.path is not None:
            stale = self._record_monitored(trainer, decision, candidates) if self.monitor is not None else \
                self._record_newest(trainer, decision.path)
        if decision.last:
            self.last_model_path = os.path.join(self.dirpath or "", LAST)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = decision.path or self.last_model_path
        return stale

    def _record_newest(self, trainer: Any, path: str) -> list[str]:
        previous, self.best_model_path = self.best_model_path, path
        return [previous] if self.save_top_k == 1 and previous and self._removable(trainer, previous, path) else []

    def _record_monitored(self, trainer: Any, decision: _Decision, candidates: dict[str, Any]) -> list[str]:
        assert decision.path is not None and decision.score is not None
        k = len(self.best_k_models) + 1 if self.save_top_k == -1 else self.save_top_k
        dropped = None
        if len(self.best_k_models) == k:
            dropped = self.kth_best_model_path
            self.best_k_models.pop(dropped)
        current = decision.score
        if torch.isnan(current):
            current = torch.tensor(float("inf" if self.mode == "min" else "-inf"))
        self.current_score = current
        self.best_k_models[decision.path] = current
        worst, best = (max, min) if self.mode == "min" else (min, max)
        if len(self.best_k_models) == k:
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.__getitem__)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.best_model_path = best(self.best_k_models, key=self.best_k_models.__getitem__)
        self.best_model_score = self.best_k_models[self.best_model_path]
        if self.verbose:
            decision.note = (f"Epoch {candidates['epoch']:d}, global step {candidates['step']:d}: {self.monitor!r} "
                             f"reached {current:0.5f} (best {self.best_model_score:0.5f}), saving model to "
                             f"{decision.path!r} as top {k}")
        return [dropped] if dropped and self._removable(trainer, dropped, decision.path) else []

    def _removable(self, trainer: Any, previous: str, current: str) -> bool:
        """Whether ``previous`` may be deleted: not the new file, not the one this run resumed
        from, and inside ``dirpath`` (files elsewhere are the user's)."""
        if previous == current:
            return False
        previous_path = Path(previous).absolute()
        if trainer.ckpt_path is not None and previous_path == Path(trainer.ckpt_path).absolute():
            return False
        return Path(self.dirpath or "").absolute() in previous_path.parents

    def _write(self, trainer: Any, decision: _Decision, stale: list[str]) -> None:
        path = decision.path or self.last_model_path
        then = self._after_write(decision.path is not None and decision.last, stale) if trainer.is_global_zero \
            else None
        trainer.save_checkpoint(path, weights_only=self.save_weights_only, blocking=False, then=then)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _after_write(self, link_last: bool, stale: list[str]) -> Callable[[str], None]:
        """On rank zero's writer thread, once the file is complete: point last.ckpt at it, then drop stale files."""
        directory = self.dirpath or ""

        def done(written: str) -> None:
            if link_last:
                point_last(directory, written)
            for old in stale:
                remove(old)

        return done

    def to_yaml(self, filepath: str | os.PathLike | None = None) -> None:
        """Write ``best_k_models`` (path: score) to ``filepath`` (default ``dirpath/best_k_models.yaml``)."""
        if filepath is None:
            assert self.dirpath
            filepath = os.path.join(self.dirpath, "best_k_models.yaml")
        with open(filepath, "w") as f:
            yaml.dump({path: score.item() for path, score in self.best_k_models.items()}, f)
