"""Strategy: owns processes and devices, and every device-, wrapping- and state-dict-specific step.

Loops never touch devices, wrappers or collectives directly; they ask the Strategy. It
places and wraps the module, builds the optimizers over the wrapped parameters, gives
and loads the module and optimizer state dicts (on every rank: a collective where the
strategy needs one), and writes and reads checkpoints. Adding a strategy (FSDP2) therefore
changes no loop and no Trainer code.
"""

from __future__ import annotations

import contextlib
import sys
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from distloop.checkpoint import BackgroundWriter, CheckpointError, load, newest_valid, snapshot, write_atomic
from distloop.errors import MisconfigurationError
from distloop.module import takes_argument
from distloop.optim import LoopOptimizer, LRSchedulerConfig, parse_optimizers
from distloop.strategies.precision import NO_CONTEXT, Precision

T = TypeVar("T")


class Strategy(ABC):
    """Collectives (``reduce``, ``broadcast``, ``barrier``, ``all_gather``), placement and stepping."""

    def __init__(self, device: torch.device | str, precision: Any = "32") -> None:
        self._root_device = torch.device(device)
        self.precision = Precision(precision, self._root_device)
        self.module: nn.Module | None = None
        self.optimizers: list[Optimizer] = []
        self.loop_optimizers: list[LoopOptimizer] = []  # what ``LoopModule.optimizers()`` returns
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self.checkpoint_writer = BackgroundWriter()
        self._training_step: Callable[[Any, int], Any] = _not_set_up
        self._unscaled: set[Optimizer] = set()  # unscaled by manual clipping since their last step

    @property
    def root_device(self) -> torch.device:
        return self._root_device

    @property
    @abstractmethod
    def world_size(self) -> int: ...

    @property
    @abstractmethod
    def global_rank(self) -> int: ...

    @property
    @abstractmethod
    def local_rank(self) -> int: ...

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    # --------------------------------------------------------------- set-up
    def setup_environment(self) -> None:
        """Start processes groups, bind devices: once, before anything else."""
        if self.root_device.type == "cuda":
            torch.cuda.set_device(self.root_device)

    def setup_module(self, module: nn.Module) -> nn.Module:
        """Move the module to the device and wrap it if the strategy needs to; returns what to call."""
        self.module = module.to(self.root_device)
        self._training_step = training_step_of(self.module)
        return self.module

    def setup_optimizers(self, module: Any) -> None:
        """After ``setup_module``: the optimizers and schedulers of ``configure_optimizers``.

        Built here, after wrapping, because a strategy that shards parameters must hand the
        optimizer the sharded ones.
        """
        setup = parse_optimizers(module.configure_optimizers(), getattr(module, "automatic_optimization", True),
                                 module.training_step)
        self.optimizers, self.lr_scheduler_configs = setup.optimizers, setup.lr_scheduler_configs
        self.loop_optimizers = [LoopOptimizer(o, self.manual_optimizer_step, self.toggled_model)
                                for o in self.optimizers]
        self._unscaled = set()

    def teardown(self) -> None:
        """Release what ``setup_environment`` took; also called when training raised."""
        self._training_step = _not_set_up  # it holds the module and whatever wraps it
        self.checkpoint_writer.close()

    # --------------------------------------------------------------- per step
    def batch_to_device(self, batch: Any) -> Any:
        """The batch on the root device; on CPU, as it is (loaders yield CPU tensors)."""
        if self.root_device.type == "cpu":
            return batch
        return _to_device(batch, self.root_device)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        """Run the module's ``training_step`` through whatever wraps it (DDP hooks need the wrapper)."""
        return self._training_step(batch, batch_idx)

    def sync_trainable_parameters(self) -> None:
        """Called at every epoch start, after ``on_train_epoch_start``: a strategy whose gradient
        sync was built for the parameters that required grad then (DDP's reducer) rebuilds it
        when a callback has frozen or unfrozen some since."""

    def no_backward_sync(self, accumulating: bool) -> ContextManager:
        """While accumulating, skip the gradient all-reduce (DDP's ``no_sync``)."""
        return NO_CONTEXT

    def autocast(self) -> ContextManager:
        """The precision's autocast context for forward passes (``NO_CONTEXT`` in full precision)."""
        return self.precision.autocast()

    def evaluation_context(self, inference_mode: bool) -> ContextManager:
        """No autograd while evaluating: ``torch.inference_mode`` (Trainer(inference_mode=True)) or ``no_grad``."""
        return torch.inference_mode() if inference_mode else torch.no_grad()

    def evaluation_steps_to_pad(self, batches: float | None) -> int:
        """How many steps more than its own ``batches`` this rank must run in an evaluation pass,
        for strategies whose forward is a collective (FSDP); 0 for every other."""
        return 0

    def backward(self, loss: Tensor) -> None:
        self.precision.backward(loss)

    def clip_gradients(self, optimizer: Optimizer, clip_val: float, algorithm: str) -> None:
        self.precision.unscale_gradients(optimizer)
        clip_gradients_of(optimizer, clip_val, algorithm)

    def optimizer_step(self, optimizer: Optimizer) -> None:
        self.precision.optimizer_step(optimizer)

    # --------------------------------------------------------------- manual optimization
    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``LoopModule.manual_backward``: backward through the grad scaler (under "16-mixed");
        ``args`` and ``kwargs`` go to ``Tensor.backward``."""
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward(*args, **kwargs)

    def manual_optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any],
                              before_step: Callable[[], Any] = lambda: None, /, **kwargs: Any) -> Any:
        """A ``LoopOptimizer.step``: ``closure``, then ``before_step`` (the hook; gradients unscaled
        by then), then the update, through the grad scaler under "16-mixed" (which skips an update
        from non-finite gradients). Returns what the optimizer's ``step`` returns."""
        scaler = self.precision.scaler
        if scaler is None:
            def closure_then_hook() -> Any:
                out = closure()
                before_step()
                return out

            return optimizer.step(closure=closure_then_hook, **kwargs)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise MisconfigurationError("precision='16-mixed' cannot step LBFGS: its closure runs "
                                        "several times per step, which a grad scaler does not support.")
        closure()
        if optimizer not in self._unscaled and not _unscales_itself(optimizer):
            scaler.unscale_(optimizer)
        before_step()
        out = scaler.step(optimizer, **kwargs)
        scaler.update()  # forgets what every optimizer had unscaled
        self._unscaled.clear()
        return out

    def manual_clip_gradients(self, optimizer: Optimizer, clip_val: float, algorithm: str) -> None:
        """``LoopModule.clip_gradients``: clip the true (unscaled) gradients, once unscaled before the step."""
        scaler = self.precision.scaler
        if scaler is not None:
            if _unscales_itself(optimizer):
                raise RuntimeError(f"{type(optimizer).__qualname__} unscales gradients inside its step (a fused "
                                   "optimizer?), so they cannot be clipped before it under precision='16-mixed'.")
            if optimizer not in self._unscaled:
                scaler.unscale_(optimizer)
                self._unscaled.add(optimizer)
        clip_gradients_of(optimizer, clip_val, algorithm)

    @contextlib.contextmanager
    def toggled_model(self, optimizer: Any, sync_grad: bool) -> Iterator[None]:
        """``LoopOptimizer.toggle_model``: only ``optimizer``'s parameters require grad inside;
        with ``sync_grad=False`` backward skips the gradient sync across ranks."""
        assert self.module is not None
        with self.no_backward_sync(not sync_grad):
            self.module.toggle_optimizer(optimizer)
            try:
                yield
            finally:
                self.module.untoggle_optimizer(optimizer)

    # --------------------------------------------------------------- collectives
    @abstractmethod
    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor:
        """The cross-rank reduction ('mean', 'sum', 'max' or 'min') of ``tensor``."""

    @abstractmethod
    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` on every rank."""

    @abstractmethod
    def barrier(self, name: str | None = None) -> None:
        """Wait until every rank gets here."""

    @abstractmethod
    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor``, stacked along a new first dimension."""

    @abstractmethod
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        """True if every rank (``all=True``) or any rank (``all=False``) decided True."""

    @abstractmethod
    def gather_object(self, obj: T) -> list[T]:
        """Every rank's picklable ``obj``, in rank order (for small things: RNG states)."""

    @abstractmethod
    def check_all_ranks_here(self, what: str) -> None:
        """Raise a clear error, instead of hanging, when some rank does not reach this collective."""

    # --------------------------------------------------------------- checkpoint state and I/O
    def module_state_dict(self) -> dict[str, Tensor]:
        """The module's state for a checkpoint; every rank calls it."""
        assert self.module is not None
        return self.module.state_dict()

    def load_module_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        assert self.module is not None
        self.module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """``optimizer``'s state for a checkpoint; every rank calls it."""
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, blocking: bool = True,
                        then: Callable[[str], None] | None = None) -> None:
        """Write ``checkpoint`` to ``path``: one file, written atomically by global rank zero.

        Every rank calls it. With ``blocking=False`` the caller waits only for a copy of the
        state, the file is written in the background, and ``then(path)`` runs once it is
        complete; a failed write is reported by ``checkpoint_error`` (or raised by the next save).
        """
        if not blocking:
            if self.is_global_zero:
                self.checkpoint_writer.submit(snapshot(checkpoint), path, then)
            return
        error: Exception | None = None
        if self.is_global_zero:
            try:
                self.checkpoint_writer.wait()
                write_atomic(checkpoint, path)
                if then is not None:
                    then(path)
            except Exception as err:  # noqa: BLE001 - every rank raises below, none waits for rank 0
                error = err
        # Also the barrier: the file is there for all.
        self.agree_on_write(error, f"Global rank zero could not write checkpoint {path}; its error says why.")

    def agree_on_write(self, error: BaseException | None, elsewhere: str) -> None:
        """A collective: every rank raises if any rank's write failed, its own ``error`` or a
        ``CheckpointError(elsewhere)``, so that none goes on to wait for a rank that stopped."""
        if not self.reduce_boolean_decision(error is None):
            raise error if error is not None else CheckpointError(elsewhere)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """The checkpoint at ``path`` on this rank (``CheckpointError`` if it is not a valid one)."""
        return load(path)

    def newest_checkpoint(self, directories: list[str]) -> str | None:
        """The newest valid checkpoint in ``directories`` as rank zero sees it, on every rank."""
        found = None
        if self.is_global_zero:
            found, skipped = newest_valid(directories)
            for note in skipped:
                print(f"distloop: skipping a bad checkpoint: {note}", file=sys.stderr)
        return self.broadcast(found)

    def checkpoint_error(self) -> BaseException | None:
        """The error of a background write that failed on this rank, once; ``None`` otherwise."""
        return self.checkpoint_writer.take_error()

    def wait_for_checkpoints(self) -> None:
        """Block until every background write is done (at the end of a run); ``checkpoint_error``
        then says whether one failed."""
        self.checkpoint_writer.join()


def training_step_of(module: nn.Module) -> Callable[[Any, int], Any]:
    """``module.training_step`` called as ``(batch, batch_idx)``: ``batch_idx`` reaches it only when
    it takes one (Lightning's rule). Decided once per run, not per step."""
    step = module.training_step
    if takes_argument(step, "batch_idx", 1):
        return step
    return lambda batch, batch_idx: step(batch)


def _not_set_up(batch: Any, batch_idx: int) -> Any:
    raise RuntimeError("Strategy.training_step before setup_module: the strategy has no module yet.")


def clip_gradients_of(optimizer: Optimizer, clip_val: float, algorithm: str) -> None:
    """Clip the gradients of ``optimizer``'s parameters by total norm ("norm") or by value ("value")."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)


def _unscales_itself(optimizer: Optimizer) -> bool:
    """Whether the optimizer unscales fp16 gradients in its own step (fused optimizers)."""
    return getattr(optimizer, "_step_supports_amp_scaling", False)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    return batch
