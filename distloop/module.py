"""LoopModule: the user's model, its step functions, optimizers, hooks and ``self.log``."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import TYPE_CHECKING, IO, Any, Callable, Iterator, Mapping, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from distloop.errors import MisconfigurationError
from distloop.hparams import HyperparametersMixin, load_module
from distloop.optim import LoopOptimizer
from distloop.results import ResultCollection, is_metric

if TYPE_CHECKING:
    from torchmetrics import Metric

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

    __slots__ = ("fx", "results", "batch", "batch_size", "dataloader_idx")

    def __init__(self) -> None:
        self.fx: str | None = None
        self.results: ResultCollection | None = None
        self.batch: Any = None
        self.batch_size: int | None = None
        self.dataloader_idx: int | None = None  # set when an evaluation runs several dataloaders


_M = TypeVar("_M", bound="LoopModule")


class LoopModule(HyperparametersMixin, nn.Module):
    """Subclass it like a ``LightningModule``: ``training_step``, ``configure_optimizers``, hooks, ``self.log``."""

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Any = None
        self.log_context = StepContext()
        self._metric_names: dict[int, str] | None = None

    @classmethod
    def load_from_checkpoint(
        cls: type[_M],
        checkpoint_path: str | os.PathLike | IO,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> _M:
        """The module a checkpoint was saved from, as Lightning's: ``cls(**hparams)``, ``kwargs``
        overriding the saved hparams (or giving those that could not be saved), then its weights.

        ``map_location`` as in ``torch.load`` (default: the saved devices, or the CPU where one
        is absent); ``hparams_file``: a ``.yaml`` / ``.csv`` whose hparams replace the saved ones;
        ``strict`` (default ``True``): every ``state_dict`` key must match. The module is in
        training mode; call ``.eval()`` to predict. See ``distloop.hparams.load_module``.
        """
        return load_module(cls, checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)

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

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self.trainer.local_rank if self._trainer is not None else 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the module's floating-point parameters (the default dtype when it has none)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def loggers(self) -> list[Any]:
        return self.trainer.loggers if self._trainer is not None else []

    @property
    def logger(self) -> Any:
        """The first logger, or ``None``."""
        return self.trainer.logger if self._trainer is not None else None

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank zero only, so a message appears once per job."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Every rank's tensors (in nested lists, tuples and dicts) stacked along a new first
        dimension; with one process, ``data`` as it is (as in Lightning). A collective."""
        if group is not None:
            raise MisconfigurationError("all_gather(group=...) is not supported: it gathers over all ranks.")
        if self._trainer is None or self.trainer.world_size == 1:
            return data
        strategy = self.trainer.strategy
        if sync_grads:
            import torch.distributed.nn.functional as dist_fn

            return _apply_to_tensors(data, lambda t: torch.stack(dist_fn.all_gather(t.contiguous())))
        return _apply_to_tensors(data, lambda t: strategy.all_gather(torch.as_tensor(t, device=self.device)))

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

    # ------------------------------------------------------------ manual optimization
    _automatic_optimization = True  # Lightning's default; `self.automatic_optimization = False` sets it per module
    _param_requires_grad_state: dict[Tensor, bool] = {}  # what toggle_optimizer changed; replaced, never mutated

    @property
    def automatic_optimization(self) -> bool:
        """False: ``training_step`` calls ``self.manual_backward(loss)``, ``opt.step()`` and
        ``opt.zero_grad()`` itself (needed for several optimizers). Set it in ``__init__``."""
        return self._automatic_optimization

    @automatic_optimization.setter
    def automatic_optimization(self, automatic_optimization: bool) -> None:
        self._automatic_optimization = automatic_optimization

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        """The optimizer, or the list of them when there are several (or none), of ``configure_optimizers``:
        wrapped as ``LoopOptimizer`` (steps through the precision, hooks and global step) unless
        ``use_pl_optimizer=False``."""
        trainer = self.trainer
        optimizers = trainer.strategy.loop_optimizers if use_pl_optimizer else trainer.optimizers
        if len(optimizers) == 1 and isinstance(optimizers[0], Optimizer):
            return optimizers[0]
        return optimizers

    def lr_schedulers(self) -> Any:
        """``None``, the scheduler, or the list of them; in manual optimization step them yourself."""
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        if not schedulers:
            return None
        return schedulers[0] if len(schedulers) == 1 else schedulers

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward in manual optimization: the backward hooks, the grad scaler under "16-mixed", the
        gradients averaged over the ranks under DDP. ``args``/``kwargs`` go to ``Tensor.backward``."""
        if self.automatic_optimization:
            raise MisconfigurationError(
                "manual_backward is for manual optimization: set `self.automatic_optimization = False` in "
                "__init__, or return the loss from training_step and let the Trainer run backward.")
        trainer = self.trainer
        trainer.hooks("on_before_backward", loss)
        trainer.strategy.manual_backward(loss, *args, **kwargs)
        trainer.hooks("on_after_backward")

    def toggle_optimizer(self, optimizer: Optimizer | LoopOptimizer) -> None:
        """Only ``optimizer``'s parameters require grad until ``untoggle_optimizer``, so a loss reaching
        another optimizer's parameters (a GAN's discriminator) leaves them without gradients."""
        saved: dict[Tensor, bool] = {}
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                for param in group["params"]:
                    if param not in saved:
                        saved[param] = param.requires_grad
                        param.requires_grad = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.requires_grad = saved[param]
        self._param_requires_grad_state = saved

    def untoggle_optimizer(self, optimizer: Optimizer | LoopOptimizer) -> None:
        """Give the other optimizers' parameters back the ``requires_grad`` they had before ``toggle_optimizer``."""
        toggled = optimizer.optimizer if isinstance(optimizer, LoopOptimizer) else optimizer
        saved = self._param_requires_grad_state
        for opt in self.trainer.optimizers:
            if opt is toggled:
                continue
            for group in opt.param_groups:
                for param in group["params"]:
                    if param in saved:
                        param.requires_grad = saved[param]
        self._param_requires_grad_state = {}

    @contextlib.contextmanager
    def toggled_optimizer(self, optimizer: Optimizer | LoopOptimizer) -> Iterator[None]:
        """``toggle_optimizer`` for the ``with`` block, then ``untoggle_optimizer``."""
        self.toggle_optimizer(optimizer)
        try:
            yield
        finally:
            self.untoggle_optimizer(optimizer)

    def clip_gradients(self, optimizer: Optimizer | LoopOptimizer, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Clip ``optimizer``'s gradients (their true size under "16-mixed"): by total norm ("norm", the
        default) or by value; the Trainer's ``gradient_clip_val`` / ``gradient_clip_algorithm`` when not given."""
        trainer = self.trainer
        if gradient_clip_val is None:
            gradient_clip_val = trainer.gradient_clip_val or 0.0
        elif trainer.gradient_clip_val is not None and trainer.gradient_clip_val != gradient_clip_val:
            raise MisconfigurationError(
                f"clip_gradients(gradient_clip_val={gradient_clip_val!r}) contradicts "
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val!r}): set one of them.")
        if gradient_clip_algorithm is None:
            gradient_clip_algorithm = trainer.gradient_clip_algorithm or "norm"
        else:
            gradient_clip_algorithm = gradient_clip_algorithm.lower()
            # The Trainer's algorithm counts only where it clips: its default is not a choice made.
            if trainer.gradient_clip_val is not None and trainer.gradient_clip_algorithm != gradient_clip_algorithm:
                raise MisconfigurationError(
                    f"clip_gradients(gradient_clip_algorithm={gradient_clip_algorithm!r}) contradicts "
                    f"Trainer(gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}): set one of them.")
        if not isinstance(gradient_clip_val, (int, float)):
            raise TypeError(f"gradient_clip_val must be an int or a float; got {gradient_clip_val!r}.")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise MisconfigurationError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'.")
        if gradient_clip_val <= 0:
            return
        raw = optimizer.optimizer if isinstance(optimizer, LoopOptimizer) else optimizer
        strategy = trainer.strategy
        clip = strategy.clip_gradients if self.automatic_optimization else strategy.manual_clip_gradients
        clip(raw, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------ data (Lightning's DataHooks)
    prepare_data_per_node: bool = True  # prepare_data on local rank zero of every node (False: global rank zero)

    def prepare_data(self) -> None:
        """Download or preprocess once per node (or per job), before ``setup`` on every rank."""

    def train_dataloader(self) -> Any:
        """The training data when ``fit`` is given none and no datamodule."""
        raise MisconfigurationError(f"{type(self).__name__} does not define `train_dataloader()`.")

    def val_dataloader(self) -> Any:
        raise MisconfigurationError(f"{type(self).__name__} does not define `val_dataloader()`.")

    def test_dataloader(self) -> Any:
        raise MisconfigurationError(f"{type(self).__name__} does not define `test_dataloader()`.")

    def predict_dataloader(self) -> Any:
        raise MisconfigurationError(f"{type(self).__name__} does not define `predict_dataloader()`.")

    # ------------------------------------------------------------ hooks (no-ops)
    def configure_model(self) -> None:
        """Build (large) layers here, under the strategy, before it wraps the module; called every run."""

    def on_exception(self, exception: BaseException) -> None: ...
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
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
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
        add_dataloader_idx: bool = True,
        rank_zero_only: bool = False,
        enable_graph: bool = False,
        metric_attribute: str | None = None,
    ) -> None:
        """Log a number, scalar tensor or torchmetrics ``Metric`` from a hook the Trainer runs.

        Defaults follow Lightning: step values in ``training_step`` and the training batch
        hooks, epoch values everywhere else. An epoch mean is weighted by ``batch_size``
        (found from the batch when not given). With several evaluation dataloaders the name
        gets Lightning's ``/dataloader_idx_N`` suffix unless ``add_dataloader_idx=False``.
        ``rank_zero_only`` values are not synced (only rank zero logs them); ``enable_graph``
        is accepted for Lightning code: logged values are always detached.
        """
        ctx = self.log_context
        results, fx = ctx.results, ctx.fx
        if results is None or fx is None:
            raise MisconfigurationError(
                f"`self.log({name!r}, ...)` was called outside a hook the Trainer runs "
                f"(current hook: {fx!r}); log from a step or epoch hook."
            )
        if ctx.dataloader_idx is not None and add_dataloader_idx:
            name = f"{name}/dataloader_idx_{ctx.dataloader_idx}"
        step_hook = fx in _STEP_HOOKS
        if on_step is None:
            on_step = step_hook
        if on_epoch is None:
            on_epoch = not step_hook
        if rank_zero_only:
            sync_dist = False  # as Lightning: a value only rank zero logs is never synced
        if isinstance(value, Tensor):  # the hot path: see ResultCollection.try_log
            size = ctx.batch_size if batch_size is None else batch_size
            args = (on_step, on_epoch, reduce_fx, sync_dist, prog_bar, logger, None)
            if size.__class__ is int and results.try_log(fx + "." + name, args, value, size):
                return
        if not isinstance(value, (Tensor, int, float)) and is_metric(value):
            metric_attribute = metric_attribute or self._metric_attribute(value, name)
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
            self._metric_names = {id(m): n for n, m in self.named_modules() if is_metric(m)}
        found = self._metric_names.get(id(metric))
        if found is None:
            self._metric_names = {id(m): n for n, m in self.named_modules() if is_metric(m)}
            found = self._metric_names.get(id(metric))
        if found is None:
            raise MisconfigurationError(
                f"`self.log({name!r}, metric)`: the Metric must be an attribute of the module "
                "(e.g. `self.acc = Accuracy(...)` in `__init__`) so its state can be checkpointed."
            )
        return found

def _apply_to_tensors(data: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(data, Tensor):
        return fn(data)
    if isinstance(data, (int, float)):
        return fn(torch.tensor(data))
    if isinstance(data, Mapping):
        return type(data)({k: _apply_to_tensors(v, fn) for k, v in data.items()})  # type: ignore[call-arg]
    if isinstance(data, (list, tuple)):
        items = [_apply_to_tensors(v, fn) for v in data]
        return type(data)(*items) if hasattr(data, "_fields") else type(data)(items)
    return data


def overrides(obj: Any, base: type, name: str) -> bool:
    """Whether ``obj``'s class defines ``name`` differently from ``base`` (a hook the user wrote)."""
    return getattr(type(obj), name, None) is not getattr(base, name, None)


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
