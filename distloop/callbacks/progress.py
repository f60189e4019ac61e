"""ProgressBar: what every progress bar shares. Rank zero only, the stream, copies without a live
display, the metrics shown, and one line per epoch where the stream is not a terminal (CI logs, files)."""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any

from distloop.callbacks.callback import Callback


class ProgressBar(Callback):
    """The base of the progress bars, as Lightning's: subclass it for a bar of your own.

    A bar shows on global rank zero only (``setup`` disables it elsewhere), while enabled and with
    a ``refresh_rate`` above 0. On a terminal a subclass draws; elsewhere the base prints one line
    per epoch. The metrics shown are those the Trainer last read (every ``log_every_n_steps``
    batches and at epoch ends): a bar never forces a sync.
    """

    may_set_should_stop = False
    # Attributes holding this process's display (or its trainer): a copy or a pickle starts without them.
    _live: tuple[str, ...] = ("_trainer",)

    def __init__(self, refresh_rate: int = 1, stream: Any = None) -> None:
        self._refresh_rate = refresh_rate
        self._stream = stream  # None: sys.stderr, looked up when written to (so the bar copies and pickles)
        self._enabled = True
        self._trainer: Any = None
        self._draws = False  # decided when training starts: a drawn bar, or a line per epoch
        self._epoch_start = 0.0
        self._current_eval_dataloader_idx: int | None = None

    # ------------------------------------------------------------ state
    @property
    def stream(self) -> Any:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        """Whether the stream is a terminal the bar can draw on."""
        return bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def refresh_rate(self) -> int:
        return self._refresh_rate

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self._refresh_rate > 0

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in self._live:
            state[name] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> ProgressBar:
        """A copy with no live display that writes to the same stream (a stream is shared, never copied)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = self.__getstate__()
        stream = state.pop("_stream")
        clone.__dict__.update(copy.deepcopy(state, memo))
        clone._stream = stream
        return clone

    # ------------------------------------------------------------ what is shown (Lightning's names)
    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            raise TypeError(f"The `{type(self).__name__}._trainer` reference has not been set yet.")
        return self._trainer

    @property
    def sanity_check_description(self) -> str:
        return "Sanity Checking"

    @property
    def validation_description(self) -> str:
        return "Validation"

    @property
    def total_train_batches(self) -> int | float:
        """This epoch's batches (``inf`` for an endless loader), fewer where ``max_steps`` ends an endless run."""
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps > 0:
            return min(trainer.num_training_batches, trainer.max_steps - trainer.global_step)
        return trainer.num_training_batches

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        trainer = self.trainer
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        return batches[self._current_eval_dataloader_idx or 0]

    def has_dataloader_changed(self, dataloader_idx: int) -> bool:
        changed = self._current_eval_dataloader_idx != dataloader_idx
        self._current_eval_dataloader_idx = dataloader_idx
        return changed

    def reset_dataloader_idx_tracker(self) -> None:
        self._current_eval_dataloader_idx = None

    def get_metrics(self, trainer: Any, module: Any) -> dict[str, int | str | float]:
        """The run's version (``v_num``, with a logger) and the ``prog_bar`` metrics: override it to change them."""
        versions = [lg.version for lg in trainer.loggers]
        version = versions[0] if len(versions) == 1 else "_".join(dict.fromkeys(str(v) for v in versions))
        standard = {} if version in ("", None) else {"v_num": version[-4:] if isinstance(version, str) else version}
        return {**standard, **trainer.progress_bar_metrics}

    # ------------------------------------------------------------ hooks
    def setup(self, trainer: Any, module: Any, stage: str) -> None:
        self._trainer = trainer
        if not trainer.is_global_zero:
            self.disable()

    def on_train_start(self, trainer: Any, module: Any) -> None:
        self._draws = self.is_enabled and self.interactive

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if not self.is_enabled or self._draws:
            return
        seconds = time.perf_counter() - self._epoch_start
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        metrics = " ".join(f"{k}={v}" for k, v in format_metrics(self.get_metrics(trainer, module)).items())
        print(f"Epoch {trainer.current_epoch}: {batches} batches in {seconds:.2f}s "
              f"({batches / max(seconds, 1e-9):.1f} batch/s) {metrics}".rstrip(), file=self.stream, flush=True)


def format_metrics(metrics: dict[str, Any], spec: str = ".4g") -> dict[str, str]:
    """Each value as text: floats with ``spec``, anything else (an int ``v_num``, a string) as it prints."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = str(value) if isinstance(value, (str, int)) else format(value, spec)
        except (TypeError, ValueError):
            out[name] = str(value)
    return out


def finite_or_none(total: int | float) -> int | None:
    """A bar's total: ``None`` (no total) for an endless loader."""
    return None if math.isinf(total) or math.isnan(total) else int(total)
