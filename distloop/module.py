"""LoopModule: the user's model, its step functions, optimizers, hooks and ``self.log``."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from distloop.errors import MisconfigurationError
from distloop.results import ResultCollection

# Hooks where ``self.log`` defaults to step values; everywhere else it defaults to epoch values.
_STEP_HOOKS = frozenset({"training_step", "on_train_batch_start", "on_train_batch_end",
                         "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                         "on_before_zero_grad"})


class StepContext:
    """Where ``self.log`` is called from: the hook (``fx``), the result collection it logs
    into, and the batch (with its size, for batch-weighted means).

    ``LoopModule.log_context`` is one; the loops set ``results`` and the batch, the hook
    dispatch sets ``fx``: the one interface between them and ``self.log``. A plain object,
    because setting attributes on an ``nn.Module`` is slow on the hot path.
    """

    __slots__ = ("fx", "results", "batch", "batch_size")

    def __init__(self) -> None:
        self.fx: str | None = None
        self.results: ResultCollection | None = None
        self.batch: Any = None
        self.batch_size: int | None = None


class LoopModule(nn.Module):
    """Subclass it like a ``LightningModule``: ``training_step``, ``configure_optimizers``, hooks, ``self.log``."""

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Any = None
        self.log_context = StepContext()
        self._metric_names: dict[int, str] | None = None

    # ------------------------------------------------------------ trainer access
    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Trainer; call it from a Trainer hook.")
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self._trainer = trainer

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self._trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self.trainer.global_step if self._trainer is not None else 0

    # ------------------------------------------------------------ what users write
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | Mapping[str, Any]:
        """Return the loss (a scalar tensor) or a dict with a ``"loss"`` key."""
        raise MisconfigurationError(
            f"{type(self).__name__} does not define `training_step(self, batch, batch_idx)`; "
            "`Trainer.fit` needs it to return the loss."
        )

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        """Log validation metrics with ``self.log``."""

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """Log test metrics with ``self.log``."""

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """What ``Trainer.predict`` collects per batch; the default calls the module on the batch."""
        return self(batch)

    def configure_optimizers(self) -> Any:
        """An optimizer; or ``(optimizers, schedulers)``; or ``{"optimizer": ..., "lr_scheduler": ...}``."""
        raise MisconfigurationError(
            f"{type(self).__name__} does not define `configure_optimizers()`; `Trainer.fit` needs it "
            "to return an optimizer (optionally with an LR scheduler)."
        )

    # ------------------------------------------------------------ hooks (no-ops)
    def setup(self, stage: str) -> None: ...
    def teardown(self, stage: str) -> None: ...
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None: ...
    def on_before_backward(self, loss: Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    # ------------------------------------------------------------ logging
    def log(
        self,
        name: str,
        value: Any,
        *,
        on_step: bool | None = None,
        on_epoch: bool | None = None,
        reduce_fx: str | Callable = "mean",
        sync_dist: bool = False,
        prog_bar: bool = False,
        logger: bool = True,
        batch_size: int | None = None,
    ) -> None:
        """Log a number, scalar tensor or torchmetrics ``Metric`` from a hook the Trainer runs.

        Defaults follow Lightning: step values in ``training_step`` and the training batch
        hooks, epoch values everywhere else. An epoch mean is weighted by ``batch_size``
        (found from the batch when not given).
        """
        ctx = self.log_context
        results, fx = ctx.results, ctx.fx
        if results is None or fx is None:
            raise MisconfigurationError(
                f"`self.log({name!r}, ...)` was called outside a hook the Trainer runs "
                f"(current hook: {fx!r}); log from a step or epoch hook."
            )
        step_hook = fx in _STEP_HOOKS
        if on_step is None:
            on_step = step_hook
        if on_epoch is None:
            on_epoch = not step_hook
        if isinstance(value, Tensor):  # the hot path: see ResultCollection.try_log
            size = ctx.batch_size if batch_size is None else batch_size
            args = (on_step, on_epoch, reduce_fx, sync_dist, prog_bar, logger, None)
            if size.__class__ is int and results.try_log(fx + "." + name, args, value, size):
                return
        metric_attribute = None
        if not isinstance(value, (Tensor, int, float)) and isinstance(value, Metric):
            metric_attribute = self._metric_attribute(value, name)
        elif on_epoch and batch_size is None:
            batch_size = ctx.batch_size
            if batch_size is None:
                batch_size = ctx.batch_size = batch_size_of(ctx.batch)
        results.log(fx, name, value, on_step=on_step, on_epoch=on_epoch, reduce_fx=reduce_fx,
                    sync_dist=sync_dist, prog_bar=prog_bar, logger=logger, batch_size=batch_size,
                    metric_attribute=metric_attribute)

    def log_dict(self, dictionary: Mapping[str, Any], **kwargs: Any) -> None:
        """``self.log`` for every item, with the same arguments."""
        for name, value in dictionary.items():
            self.log(name, value, **kwargs)

    def _metric_attribute(self, metric: Metric, name: str) -> str:
        if self._metric_names is None:
            self._metric_names = {id(m): n for n, m in self.named_modules() if isinstance(m, Metric)}
        found = self._metric_names.get(id(metric))
        if found is None:
            self._metric_names = {id(m): n for n, m in self.named_modules() if isinstance(m, Metric)}
            found = self._metric_names.get(id(metric))
        if found is None:
            raise MisconfigurationError(
                f"`self.log({name!r}, metric)`: the Metric must be an attribute of the module "
                "(e.g. `self.acc = Accuracy(...)` in `__init__`) so its state can be checkpointed."
            )
        return found

def takes_argument(fn: Callable, name: str, position: int) -> bool:
    """Whether ``fn`` (a bound step or hook) accepts ``name``: by name, or through ``*args`` at
    0-based ``position``. Lightning passes ``batch_idx`` and ``dataloader_idx`` only then."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = 0
    for p in params:
        if p.name == name or p.kind is p.VAR_KEYWORD:
            return True
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional > position


def batch_size_of(batch: Any) -> int:
    """The length of the first tensor found in the batch (1 when there is none)."""
    return _first_tensor_length(batch) or 1


def _first_tensor_length(batch: Any) -> int | None:
    if type(batch) in (tuple, list) and batch and isinstance(batch[0], Tensor) and batch[0].ndim:
        return batch[0].shape[0]  # the usual (inputs, targets) batch, without recursion
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else 1
    if isinstance(batch, dict) or (not isinstance(batch, (list, tuple)) and isinstance(batch, Mapping)):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _first_tensor_length(item)
            if size is not None:
                return size
    return None
