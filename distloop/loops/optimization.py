"""Automatic optimization: forward, backward, accumulation, clipping, optimizer and scheduler steps.

A plain object owned by the training-epoch loop, not another loop level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from distloop.errors import MisconfigurationError
from distloop.optim import step_schedulers
from distloop.progress import OptimizationProgress
from distloop.strategies.precision import NO_CONTEXT


class AutomaticOptimization:
    def __init__(self, progress: OptimizationProgress) -> None:
        self.progress = progress

    def run(self, trainer: Any, batch: Any, batch_idx: int, accumulating: bool) -> Any:
        """One training batch; steps the optimizer unless ``accumulating``."""
        if accumulating:
            with trainer.strategy.no_backward_sync(True):
                return self.forward_backward(trainer, batch, batch_idx)
        outputs = self.forward_backward(trainer, batch, batch_idx)
        self.step(trainer)
        return outputs

    def forward_backward(self, trainer: Any, batch: Any, batch_idx: int) -> Any:
        """``training_step`` (under the precision's autocast), then backward; returns what it returned."""
        strategy, hooks, ctx = trainer.strategy, trainer.hooks, trainer.module.log_context
        ctx.fx = "training_step"
        try:
            autocast = strategy.autocast()
            if autocast is NO_CONTEXT:  # nothing to enter: the per-step cost counts
                outputs = strategy.training_step(batch, batch_idx)
            else:
                with autocast:
                    outputs = strategy.training_step(batch, batch_idx)
        finally:
            ctx.fx = None
        loss = _loss_of(outputs)
        nan_loss = trainer.nan_loss
        if nan_loss == "raise":  # before backward: no update is ever made from a non-finite loss
            if not loss.is_cpu:  # checked by the device, in order, before the step's kernels: no host sync
                torch._assert_async(torch.isfinite(loss.detach()), _NON_FINITE_ON_DEVICE)
            elif not math.isfinite(loss.item()):  # on the host: about 1 us
                raise FloatingPointError(_non_finite(loss.item(), trainer))
        elif nan_loss == "skip" and not strategy.reduce_boolean_decision(bool(torch.isfinite(loss))):
            return outputs  # one host sync per step, and one collective under DDP: every rank skips alike
        if trainer.accumulate_grad_batches > 1:
            loss = loss / trainer.accumulate_grad_batches
        hooks("on_before_backward", loss)
        strategy.backward(loss)
        hooks("on_after_backward")
        return outputs

    def step(self, trainer: Any) -> None:
        """Clip, step the optimizer, zero the gradients, step the per-step LR schedulers."""
        strategy, hooks = trainer.strategy, trainer.hooks
        optimizer = strategy.optimizers[0]
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
        configs = strategy.lr_scheduler_configs
        if configs:
            step_schedulers(configs, "step", trainer.global_step, lambda: trainer.callback_metrics)


_NON_FINITE_ON_DEVICE = ("distloop: the training loss is not finite (nan_loss='raise'); no update was made from it. "
                         "Lower the learning rate, set gradient_clip_val, or pass nan_loss='skip'.")


def _non_finite(loss: Any, trainer: Any) -> str:
    return (f"The training loss is {loss} at global step {trainer.global_step} (epoch {trainer.current_epoch}); "
            "no update was made from it. Lower the learning rate, set gradient_clip_val, or pass nan_loss='skip' "
            "to leave such batches out of the update.")


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
