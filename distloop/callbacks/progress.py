"""Progress: a tqdm bar on a terminal, one line per epoch elsewhere (CI logs, files)."""

from __future__ import annotations

import copy
import sys
import time
from typing import Any

from distloop.callbacks.callback import Callback


class ProgressBar(Callback):
    """Shows epoch, batch, rate and the ``prog_bar`` metrics, from global rank zero only.

    The metrics shown are those the Trainer last read (every ``log_every_n_steps``
    batches and at epoch ends): the bar itself never forces a sync.
    """

    may_set_should_stop = False

    def __init__(self, stream: Any = None) -> None:
        self._stream = stream  # None: sys.stderr, looked up when written to (so the bar copies and pickles)
        self._bar: Any = None
        self._val_bar: Any = None
        self._shown_version = -1
        self._epoch_start = 0.0

    @property
    def stream(self) -> Any:
        return self._stream if self._stream is not None else sys.stderr

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_bar"] = state["_val_bar"] = None  # a live bar draws on this process's terminal
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> ProgressBar:
        """A copy with no live bar that writes to the same stream (a stream is shared, never copied)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = self.__getstate__()
        stream = state.pop("_stream")
        clone.__dict__.update(copy.deepcopy(state, memo))
        clone._stream = stream
        return clone

    @property
    def interactive(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def _enabled(self, trainer: Any) -> bool:
        return trainer.is_global_zero

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        if not self._enabled(trainer):
            return
        self._epoch_start = time.perf_counter()
        if self.interactive:
            from tqdm.auto import tqdm

            total = trainer.num_training_batches
            self._bar = tqdm(total=None if total == float("inf") else int(total), desc=f"Epoch {trainer.current_epoch}",
                             file=self.stream, dynamic_ncols=True, leave=True, unit="batch")
            self._shown_version = -1

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        if trainer.metrics_version != self._shown_version:
            self._shown_version = trainer.metrics_version
            bar.set_postfix(_format(trainer.progress_bar_metrics), refresh=False)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        if not self._enabled(trainer):
            return
        if self._bar is not None:
            self._bar.set_postfix(_format(trainer.progress_bar_metrics))
            self._bar.close()
            self._bar = None
            return
        seconds = time.perf_counter() - self._epoch_start
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        metrics = " ".join(f"{k}={v}" for k, v in _format(trainer.progress_bar_metrics).items())
        print(f"Epoch {trainer.current_epoch}: {batches} batches in {seconds:.2f}s "
              f"({batches / max(seconds, 1e-9):.1f} batch/s) {metrics}".rstrip(), file=self.stream, flush=True)

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        if self._enabled(trainer) and self.interactive:
            from tqdm.auto import tqdm

            total = trainer.num_val_batches
            self._val_bar = tqdm(total=None if total == float("inf") else int(total),
                                 desc="Sanity check" if trainer.sanity_checking else "Validation",
                                 file=self.stream, dynamic_ncols=True, leave=False, unit="batch")

    def on_validation_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._val_bar is not None:
            self._val_bar.update(1)

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if self._val_bar is not None:
            self._val_bar.close()
            self._val_bar = None

    def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
        for bar in (self._bar, self._val_bar):
            if bar is not None:
                bar.close()
        self._bar = self._val_bar = None


def _format(metrics: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items()}
