"""Automatic optimization: forward, backward, accumulation, clipping, optimizer and scheduler steps.

A plain object owned by the training-epoch loop, not another loop level.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from distloop.errors import MisconfigurationError
from distloop.progress import OptimizationProgress


class AutomaticOptimization:
    def __init__(self, progress: OptimizationProgress) -> None:
        self.progress = progress
        self.last_loss: Tensor | None = None

    def run(self, trainer: Any, batch: Any, batch_idx: int, accumulating: bool) -> Any:
        """One training batch; steps the optimizer unless ``accumulating``."""
        if accumulating:
            with trainer.strategy.no_backward_sync(True):
                return self.backward(trainer, batch, batch_idx)
        outputs = self.backward(trainer, batch, batch_idx)
        self.step(trainer)
        return outputs

    def backward(self, trainer: Any, batch: Any, batch_idx: int) -> Any:
        """Forward (under the precision's autocast) and backward; returns what ``training_step`` returned."""
        strategy, hooks, ctx = trainer.strategy, trainer.hooks, trainer.module._ctx
        ctx.fx = "training_step"
        try:
            if strategy.precision.precision == "32":  # no autocast to enter: the per-step cost counts
                outputs = strategy.training_step(batch, batch_idx)
            else:
                with strategy.precision.autocast():
                    outputs = strategy.training_step(batch, batch_idx)
        finally:
            ctx.fx = None
        loss = self.last_loss = _loss_of(outputs)
        # nan_loss="skip" pays one host sync per step to leave this batch out.
        if trainer.nan_loss == "skip" and not bool(torch.isfinite(loss)):
            return outputs
        if trainer.accumulate_grad_batches > 1:
            loss = loss / trainer.accumulate_grad_batches
        hooks("on_before_backward", loss)
        strategy.backward(loss)
        hooks("on_after_backward")
        return outputs

    def step(self, trainer: Any) -> None:
        """Clip, step the optimizer, zero the gradients, step the per-step LR schedulers."""
        strategy, hooks, optimizer = trainer.strategy, trainer.hooks, trainer.optimizer
        hooks("on_before_optimizer_step", optimizer)
        if trainer.gradient_clip_val:
            strategy.clip_gradients(optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        progress = self.progress.optimizer
        progress.step.increment_ready()
        strategy.optimizer_step(optimizer)
        progress.step.increment_completed()
        hooks("on_before_zero_grad", optimizer)
        progress.zero_grad.increment_ready()
        progress.zero_grad.increment_started()
        optimizer.zero_grad(set_to_none=True)
        progress.zero_grad.increment_completed()
        if trainer.lr_scheduler_configs:
            trainer.step_schedulers("step")


def _loss_of(outputs: Any) -> Tensor:
    loss = outputs if isinstance(outputs, Tensor) or not isinstance(outputs, Mapping) else outputs.get("loss")
    if not isinstance(loss, Tensor):
        what = "a dict without 'loss'" if isinstance(outputs, Mapping) else repr(type(outputs).__name__)
        raise MisconfigurationError(
            f"`training_step` returned {what}; return the loss as a scalar tensor, or a dict "
            "with the loss under 'loss'."
        )
    if loss.numel() != 1:
        raise MisconfigurationError(
            f"`training_step` returned a loss of shape {tuple(loss.shape)}; it must be a scalar. "
            "Reduce it first, e.g. `loss.mean()`."
        )
    if not loss.requires_grad:
        raise MisconfigurationError(
            "`training_step` returned a loss that does not require grad: it was computed without "
            "the module's parameters or under `torch.no_grad()`."
        )
    return loss
