"""Manual optimization: ``training_step`` runs its own backward passes and optimizer steps.

Lightning's manual optimization, as a plain object the training-epoch loop owns (like
``AutomaticOptimization``), chosen for a run when ``module.automatic_optimization`` is
False. The loop only runs ``training_step``; the module does the rest through
``self.manual_backward(loss)`` and the optimizers of ``self.optimizers()``, whose ``step``
comes here: ``on_before_optimizer_step``, the strategy's step (precision, grad scaler), and
the count that is ``trainer.global_step``: one per optimizer step taken inside
``training_step``, so two optimizers stepped per batch make two global steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor
from torch.optim import Optimizer

from distloop.errors import MisconfigurationError
from distloop.progress import OptimizationProgress


class ManualOptimization:
    def __init__(self, progress: OptimizationProgress) -> None:
        self.progress = progress  # the epoch loop's: its optimizer step count is the global step
        self._trainer: Any = None
        self._in_training_step = False  # steps count only there, as in Lightning

    def connect(self, trainer: Any) -> None:
        """At the start of a run: check the Trainer's arguments, and step the module's optimizers here."""
        check_manual_optimization(trainer)
        self._trainer = trainer
        for optimizer in trainer.strategy.loop_optimizers:
            optimizer.step_fn = self.optimizer_step

    def run(self, trainer: Any, batch: Any, batch_idx: int, accumulating: bool) -> dict[str, Any]:
        """One training batch: ``training_step`` (under the precision's autocast, through the strategy).

        ``accumulating`` is always False here (manual optimization refuses
        ``accumulate_grad_batches``); it keeps the signature of ``AutomaticOptimization.run``.
        Returns what ``on_train_batch_end`` receives: the step's output as a dict, its loss detached.
        """
        strategy, ctx = trainer.strategy, trainer.module.log_context
        ctx.fx = "training_step"
        self._in_training_step = True
        try:
            with strategy.autocast():
                outputs = self.training_step(trainer, batch, batch_idx)
        finally:
            self._in_training_step = False
            ctx.fx = None
        return batch_outputs(outputs)

    def training_step(self, trainer: Any, batch: Any, batch_idx: int) -> Any:
        """The module's ``training_step``, through the strategy. Optimizer steps taken in here count
        as global steps; a subclass that drives the step its own way (the cookbook's yielding
        training step) overrides this and returns what ``training_step`` would."""
        return trainer.strategy.training_step(batch, batch_idx)

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], **kwargs: Any) -> Any:
        """What ``LoopOptimizer.step`` runs: counted as a global step when inside ``training_step``."""
        trainer = self._trainer
        counted = self._in_training_step
        step = self.progress.optimizer.step
        if counted:
            step.increment_ready()
        out = trainer.strategy.manual_optimizer_step(
            optimizer, closure, lambda: trainer.hooks("on_before_optimizer_step", optimizer), **kwargs)
        if counted:
            step.increment_completed()
        return out


def check_manual_optimization(trainer: Any) -> None:
    """The Trainer arguments manual optimization cannot honour: the module clips and accumulates itself."""
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        raise MisconfigurationError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) clips in automatic optimization only. "
            "With `automatic_optimization = False`, call `self.clip_gradients(optimizer, gradient_clip_val=..., "
            "gradient_clip_algorithm=...)` in training_step before `optimizer.step()`, and drop the argument.")
    if trainer.accumulate_grad_batches != 1:
        raise MisconfigurationError(
            f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) accumulates in automatic "
            "optimization only. With `automatic_optimization = False`, step the optimizer every N batches "
            "yourself (e.g. `if (batch_idx + 1) % N == 0: opt.step(); opt.zero_grad()`), and drop the argument.")


def batch_outputs(outputs: Any) -> dict[str, Any]:
    """``training_step``'s output in manual optimization: a tensor (the loss), a dict, or None."""
    if outputs is None:
        return {}
    if isinstance(outputs, Tensor):
        extra = {"loss": outputs}
    elif isinstance(outputs, Mapping):
        extra = dict(outputs)
    else:
        raise MisconfigurationError(
            f"In manual optimization `training_step` returns a tensor, a dict or None; it returned "
            f"{type(outputs).__name__}.")
    loss = extra.get("loss")
    if isinstance(loss, Tensor):
        extra["loss"] = loss.detach()  # the graph is the step's own business, and done with
    return extra
