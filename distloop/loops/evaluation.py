"""Evaluation loop: one pass over a validation or test dataloader, without gradients."""

from __future__ import annotations

import math
from typing import Any

import torch

from distloop.loops.fetcher import Prefetcher, next_batch
from distloop.loops.loop import Loop
from distloop.progress import BatchProgress
from distloop.results import ResultCollection


class EvaluationLoop(Loop):
    """Runs ``validation_step`` (``stage="validate"``) or ``test_step`` (``stage="test"``) per batch.

    ``run(dataloader, max_batches)`` returns the epoch metrics it logged.
    """

    def __init__(self, stage: str = "validate") -> None:
        super().__init__()
        self.stage = stage
        self.batch_progress = BatchProgress()
        self.results = ResultCollection(training=False)
        self._batches: Prefetcher | None = None
        self._was_training = False
        self._outer_results: ResultCollection | None = None

    @property
    def _hook_stage(self) -> str:
        return "validation" if self.stage == "validate" else self.stage

    @property
    def done(self) -> bool:
        return self.batch_progress.is_last_batch

    def reset(self) -> None:
        self.batch_progress.reset_on_run()
        self.results.clear()

    def on_run_start(self, dataloader: Any, max_batches: float = math.inf) -> None:
        trainer, module = self.trainer, self.trainer.module
        self._was_training = module.training
        module.eval()
        self._outer_results, module._ctx.results = module._ctx.results, self.results
        self.results.device = trainer.strategy.root_device
        self.results.sync_fn = trainer.strategy.reduce
        self._batches = Prefetcher(dataloader, max_batches)
        trainer.hooks(f"on_{self._hook_stage}_start")
        trainer.hooks(f"on_{self._hook_stage}_epoch_start")

    def advance(self, dataloader: Any, max_batches: float = math.inf) -> None:
        assert self._batches is not None
        trainer, module, progress = self.trainer, self.trainer.module, self.batch_progress
        batch, batch_idx = next_batch(self._batches, progress, trainer.strategy)
        module._ctx.batch, module._ctx.batch_size = batch, None
        stage = self._hook_stage
        trainer.hooks(f"on_{stage}_batch_start", batch, batch_idx)
        progress.increment_started()
        step = f"{stage}_step" if stage != "validation" else "validation_step"
        module._ctx.fx = step
        try:
            with torch.no_grad(), trainer.strategy.precision.autocast():
                outputs = getattr(module, step)(batch, batch_idx)
        finally:
            module._ctx.fx = None
        progress.increment_processed()
        trainer.hooks(f"on_{stage}_batch_end", outputs, batch, batch_idx)
        progress.increment_completed()

    def on_run_end(self) -> dict[str, float]:
        trainer, module = self.trainer, self.trainer.module
        stage = self._hook_stage
        trainer.hooks.module(f"on_{stage}_epoch_end")
        metrics = {} if trainer.sanity_checking else trainer.read_metrics(self.results, on_step=False)
        trainer.hooks.callbacks(f"on_{stage}_epoch_end")
        trainer.hooks(f"on_{stage}_end")
        module._ctx.results = self._outer_results
        if self._was_training:
            module.train()
        return metrics
