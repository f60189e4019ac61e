"""Prediction loop: ``predict_step`` over a dataloader, collecting what it returns."""

from __future__ import annotations

import math
from typing import Any

import torch

from distloop.loops.fetcher import BatchIterator, next_batch
from distloop.loops.loop import Loop
from distloop.progress import BatchProgress


class PredictionLoop(Loop):
    def __init__(self) -> None:
        super().__init__()
        self.batch_progress = BatchProgress()
        self.predictions: list[Any] = []
        self._batches: BatchIterator | None = None

    @property
    def done(self) -> bool:
        return self.batch_progress.is_last_batch

    def reset(self) -> None:
        self.batch_progress.reset_on_run()
        self.predictions = []

    def on_run_start(self, dataloader: Any, max_batches: float = math.inf) -> None:
        self.trainer.module.eval()
        self._batches = BatchIterator(dataloader, max_batches)
        self.trainer.hooks("on_predict_start")
        self.trainer.hooks("on_predict_epoch_start")

    def advance(self, dataloader: Any, max_batches: float = math.inf) -> None:
        assert self._batches is not None
        trainer, module, progress = self.trainer, self.trainer.module, self.batch_progress
        batch, batch_idx = next_batch(self._batches, progress, trainer.strategy)
        trainer.hooks("on_predict_batch_start", batch, batch_idx)
        progress.increment_started()
        with torch.no_grad(), trainer.strategy.autocast():
            outputs = module.predict_step(batch, batch_idx)
        progress.increment_processed()
        self.predictions.append(outputs)
        trainer.hooks("on_predict_batch_end", outputs, batch, batch_idx)
        progress.increment_completed()

    def on_run_end(self) -> list[Any]:
        self.trainer.hooks("on_predict_epoch_end")
        self.trainer.hooks("on_predict_end")
        return self.predictions
