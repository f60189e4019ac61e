"""Evaluation loop: one pass over a validation or test dataloader, without gradients."""

from __future__ import annotations

import math
from typing import Any

import torch

from distloop.loops.fetcher import BatchIterator, next_batch
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
        prefix = "validation" if stage == "validate" else stage  # Lightning's hook names
        self._step_name = f"{prefix}_step"
        self._hook_names = {part: f"on_{prefix}_{part}"
                            for part in ("start", "epoch_start", "batch_start", "batch_end", "epoch_end", "end")}
        self.batch_progress = BatchProgress()
        self.results = ResultCollection(training=False)
        self._batches: BatchIterator | None = None
        self._was_training = False
        self._outer_results: ResultCollection | None = None

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
        self._outer_results, module.log_context.results = module.log_context.results, self.results
        self.results.device = trainer.strategy.root_device
        self.results.sync_fn = trainer.metrics_sync_fn
        self._batches = BatchIterator(dataloader, max_batches)
        trainer.hooks(self._hook_names["start"])
        trainer.hooks(self._hook_names["epoch_start"])

    def advance(self, dataloader: Any, max_batches: float = math.inf) -> None:
        assert self._batches is not None
        trainer, module, progress = self.trainer, self.trainer.module, self.batch_progress
        batch, batch_idx = next_batch(self._batches, progress, trainer.strategy)
        module.log_context.batch, module.log_context.batch_size = batch, None
        trainer.hooks(self._hook_names["batch_start"], batch, batch_idx)
        progress.increment_started()
        module.log_context.fx = self._step_name
        try:
            with torch.no_grad(), trainer.strategy.autocast():
                outputs = getattr(module, self._step_name)(batch, batch_idx)
        finally:
            module.log_context.fx = None
        progress.increment_processed()
        trainer.hooks(self._hook_names["batch_end"], outputs, batch, batch_idx)
        progress.increment_completed()

    def on_run_end(self) -> dict[str, float]:
        trainer, module = self.trainer, self.trainer.module
        trainer.hooks.module(self._hook_names["epoch_end"])
        metrics = {} if trainer.sanity_checking else trainer.read_metrics(self.results, on_step=False)
        trainer.hooks.callbacks(self._hook_names["epoch_end"])
        trainer.hooks(self._hook_names["end"])
        module.log_context.results = self._outer_results
        if self._was_training:
            module.train()
        return metrics
