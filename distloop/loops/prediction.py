"""Prediction loop: ``predict_step`` over one or several dataloaders, collecting what it returns."""

from __future__ import annotations

import math
from typing import Any, Iterable


from distloop.loops.evaluation import as_dataloader_list, check_dataloader_idx, run_padding_steps
from distloop.loops.fetcher import BatchIterator, next_batch
from distloop.loops.loop import Loop
from distloop.module import takes_argument
from distloop.progress import BatchProgress
from distloop.stages import RunningStage


class PredictionLoop(Loop):
    """``run(dataloaders, max_batches)`` returns one list of ``predict_step`` outputs per dataloader."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_progress = BatchProgress()
        self.predictions: list[list[Any]] = []
        self.return_predictions = True  # False: outputs go to the batch-end hooks only (writer callbacks)
        self.dataloader_idx = 0
        self._loaders: list[Iterable] = []
        self._limits: list[float] = []
        self._batches: BatchIterator | None = None
        self._padding = 0  # steps to run after this rank's last batch (see run_padding_steps)
        self._pass_batch_idx = True

    @property
    def done(self) -> bool:
        return self.batch_progress.is_last_batch and self.dataloader_idx >= len(self._loaders) - 1

    def reset(self) -> None:
        self.batch_progress.reset_on_run()
        self.predictions = []
        self.dataloader_idx = 0

    def on_run_start(self, dataloaders: Any, max_batches: Any = math.inf) -> None:
        trainer = self.trainer
        self._loaders, self._limits = as_dataloader_list(dataloaders, max_batches)
        self.predictions = [[] for _ in self._loaders]
        trainer.state.stage = RunningStage.PREDICTING
        trainer.module.eval()
        self._pass_batch_idx = takes_argument(trainer.module.predict_step, "batch_idx", 1)
        check_dataloader_idx(trainer.module, "predict", len(self._loaders),
                             ("predict_step", "on_predict_batch_start", "on_predict_batch_end"))
        self._start_dataloader(0)
        trainer.hooks("on_predict_start")
        trainer.hooks("on_predict_epoch_start")

    def _start_dataloader(self, idx: int) -> None:
        self.dataloader_idx = idx
        self.batch_progress.current.reset()
        self.batch_progress.is_last_batch = self._limits[idx] == 0
        self._batches = BatchIterator(self._loaders[idx], self._limits[idx])
        self._padding = self.trainer.strategy.evaluation_steps_to_pad(self._batches.count)

    def advance(self, dataloaders: Any, max_batches: Any = math.inf) -> None:
        assert self._batches is not None
        trainer, module, progress = self.trainer, self.trainer.module, self.batch_progress
        while progress.is_last_batch and self.dataloader_idx < len(self._loaders) - 1:
            self._start_dataloader(self.dataloader_idx + 1)
        if progress.is_last_batch:
            raise StopIteration
        batch, batch_idx = next_batch(self._batches, progress, trainer.strategy)
        extra = (self.dataloader_idx,) if len(self._loaders) > 1 else ()
        trainer.hooks("on_predict_batch_start", batch, batch_idx, *extra)
        progress.increment_started()
        args = (batch, batch_idx, *extra) if self._pass_batch_idx else (batch, *extra)
        with trainer.strategy.evaluation_context(trainer.inference_mode), trainer.strategy.autocast():
            outputs = module.predict_step(*args)
        if progress.is_last_batch:
            run_padding_steps(trainer, module.predict_step, args, self._padding)
        progress.increment_processed()
        if self.return_predictions:
            self.predictions[self.dataloader_idx].append(outputs)
        trainer.hooks("on_predict_batch_end", outputs, batch, batch_idx, *extra)
        progress.increment_completed()

    def on_run_end(self) -> list[list[Any]]:
        self.trainer.hooks("on_predict_epoch_end")
        self.trainer.hooks("on_predict_end")
        return self.predictions
