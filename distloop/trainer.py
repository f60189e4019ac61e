"""Trainer: wires module, data, strategy, loops, callbacks and loggers, then runs a loop.

What it wires lives elsewhere, one concept a file: argument checks (``arguments.py``),
optimizers and schedulers (``optim.py``), the checkpoint's parts (``state.py``) and files
(``checkpoint.py``, written by the Strategy), requests and decisions (``control.py``),
the data position (``data.py``), RNG (``rng.py``). ``docs/architecture.md`` maps them.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from distloop.arguments import check_trainer_arguments, val_check_batches
from distloop.callbacks import Callback, ModelCheckpoint, ProgressBar
from distloop.control import Control, Request
from distloop.data import num_batches, prepare_loader
from distloop.datamodule import DataModule
from distloop.checkpoint import CheckpointError
from distloop.errors import PREEMPTED_EXIT_CODE, MisconfigurationError, Preempted
from distloop.hooks import Hooks
from distloop.loggers import Logger, resolve_loggers
from distloop.loops import EvaluationLoop, FitLoop, PredictionLoop
from distloop.module import LoopModule
from distloop.optim import LRSchedulerConfig
from distloop.results import ResultCollection
from distloop.rng import seed_everything
from distloop.state import trainer_state
from distloop.strategies import Strategy, resolve_strategy


class Trainer:
    """Runs ``fit``, ``validate``, ``test`` and ``predict`` for a ``LoopModule``.

    Arguments mean what they mean in Lightning. ``nan_loss`` says what a non-finite loss
    does: ``"raise"`` (checked before every optimizer step, so no update is made from
    it; on CUDA without a host sync), ``"skip"`` (the batch is left out of the update:
    one host sync per step) or ``"ignore"``.
    """

    def __init__(
        self,
        *,
        accelerator: str = "auto",
        devices: int | str = "auto",
        strategy: str | Strategy = "auto",
        precision: str | int = "32",
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        limit_train_batches: int | float = 1.0,
        limit_val_batches: int | float = 1.0,
        limit_test_batches: int | float = 1.0,
        limit_predict_batches: int | float = 1.0,
        val_check_interval: int | float = 1.0,
        check_val_every_n_epoch: int = 1,
        num_sanity_val_steps: int = 2,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        callbacks: Callback | list[Callback] | None = None,
        logger: bool | Logger | list[Logger] | None = True,
        log_every_n_steps: int = 50,
        enable_progress_bar: bool = True,
        default_root_dir: str | None = None,
        deterministic: bool = False,
        seed: int | None = None,
        nan_loss: str = "raise",
    ) -> None:
        if max_epochs is None:
            max_epochs = 1000 if max_steps == -1 else -1
        limits = {"limit_train_batches": limit_train_batches, "limit_val_batches": limit_val_batches,
                  "limit_test_batches": limit_test_batches, "limit_predict_batches": limit_predict_batches}
        check_trainer_arguments(
            max_epochs=max_epochs, min_epochs=min_epochs, max_steps=max_steps, limits=limits,
            val_check_interval=val_check_interval, check_val_every_n_epoch=check_val_every_n_epoch,
            num_sanity_val_steps=num_sanity_val_steps, accumulate_grad_batches=accumulate_grad_batches,
            log_every_n_steps=log_every_n_steps, gradient_clip_val=gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm, nan_loss=nan_loss)

        self.strategy = resolve_strategy(strategy, accelerator, devices, precision)
        self.max_steps = max_steps
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.limit_test_batches = limit_test_batches
        self.limit_predict_batches = limit_predict_batches
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.num_sanity_val_steps = num_sanity_val_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.log_every_n_steps = log_every_n_steps
        self.default_root_dir = os.fspath(default_root_dir) if default_root_dir is not None else os.getcwd()
        self.deterministic = deterministic
        self.seed = seed
        self.nan_loss = nan_loss

        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        if enable_progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(ProgressBar())
        self.callbacks: list[Callback] = callbacks
        self.loggers: list[Logger] = resolve_loggers(logger, self.default_root_dir, self.is_global_zero)

        self.fit_loop = FitLoop(min_epochs=min_epochs or 0, max_epochs=max_epochs)
        self.validate_loop = EvaluationLoop("validate")
        self.test_loop = EvaluationLoop("test")
        self.predict_loop = PredictionLoop()

        self.module: LoopModule | None = None
        self.datamodule: DataModule | None = None
        self.hooks: Hooks | None = None
        self.train_dataloader: Iterable | None = None
        self.val_dataloader: Iterable | None = None
        self.num_training_batches: float = math.inf
        self.num_val_batches: float = 0
        self.val_check_batches: int | None = None
        self.sanity_checking = False
        self.callback_metrics: dict[str, Tensor] = {}
        self.logged_metrics: dict[str, Tensor] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.metrics_version = 0
        self.config: dict[str, Any] | None = None  # the run's resolved config, stored in checkpoints
        self.ckpt_path: str | None = None  # the checkpoint the last run resumed from
        self._watch_resumable_points = False
        self._failure: BaseException | None = None  # this rank's failed checkpoint write, until every rank stops
        self._wrote_in_background = False  # this run saved with blocking=False (alike on every rank)
        self.control = Control()
        self.run_state = trainer_state(self)  # what a checkpoint holds: register more parts here

    # ------------------------------------------------------------ properties
    @property
    def fit_loop(self) -> FitLoop:
        return self._fit_loop

    @fit_loop.setter
    def fit_loop(self, loop: FitLoop) -> None:
        """Assign your own FitLoop (subclass) to change how training runs."""
        loop.trainer = self
        self._fit_loop = loop

    @property
    def is_global_zero(self) -> bool:
        return self.strategy.is_global_zero

    @property
    def global_rank(self) -> int:
        return self.strategy.global_rank

    @property
    def local_rank(self) -> int:
        return self.strategy.local_rank

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def optimizers(self) -> list[Optimizer]:
        return self.strategy.optimizers

    @property
    def optimizer(self) -> Optimizer | None:
        """The optimizer of automatic optimization (the first one)."""
        return self.strategy.optimizers[0] if self.strategy.optimizers else None

    @property
    def lr_scheduler_configs(self) -> list[LRSchedulerConfig]:
        return self.strategy.lr_scheduler_configs

    @property
    def metrics_sync_fn(self) -> Any:
        """What result collections reduce across ranks with; ``None`` with one process.

        One process holds global values already, and a checkpoint must then keep its
        values exactly as they are (deferred ones included) for a bitwise resume.
        """
        return self.strategy.reduce if self.world_size > 1 else None

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far."""
        return self.fit_loop.epoch_loop.optim_progress.optimizer_steps

    @property
    def current_epoch(self) -> int:
        return self.fit_loop.epoch_progress.current.completed

    @property
    def max_epochs(self) -> int:
        return self.fit_loop.max_epochs

    @property
    def has_validation(self) -> bool:
        """Whether ``fit`` validates at all (a validation loader with batches to run)."""
        return self.val_dataloader is not None and self.num_val_batches != 0

    @property
    def log_dir(self) -> str:
        return self.loggers[0].log_dir if self.loggers else self.default_root_dir

    # ------------------------------------------------------------ stopping (see control.py)
    @property
    def should_stop(self) -> bool:
        """Set it on any rank to stop ``fit``: a request the ranks agree on at the next metrics read.

        True on every rank once they have agreed, as in Lightning."""
        return self.control.requested(Request.STOP) or self.control.stop_decided

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        if value:
            self.control.request(Request.STOP)
        else:
            self.control.withdraw(Request.STOP)

    @property
    def stopping(self) -> bool:
        """Whether the loops stop: ``should_stop`` once every rank has agreed on it."""
        return self.control.stop_decided

    def stop(self) -> None:
        """Stop at once. Only for a decision every rank makes alike (e.g. after
        ``strategy.reduce_boolean_decision``); otherwise set ``should_stop``."""
        self.control.decide(Request.STOP)

    def agree_stop(self, hook: str) -> None:
        """After callbacks' ``hook``: vote on ``should_stop``, only if a callback could have set it since the last read."""
        assert self.hooks is not None
        if self.hooks.may_set_should_stop(hook):
            self.control.vote_stop(self.strategy)

    # ------------------------------------------------------------ entry points
    def fit(
        self,
        module: LoopModule,
        train_dataloaders: Iterable | None = None,
        val_dataloaders: Iterable | None = None,
        datamodule: DataModule | None = None,
        ckpt_path: str | None = None,
    ) -> None:
        """Train ``module``; every call starts from fresh progress, metrics and optimizers.

        ``ckpt_path`` resumes a run exactly: a checkpoint file, or ``"last"`` for the newest
        valid checkpoint in the checkpoint directories (a fresh start when there is none).
        """
        _check_module(module, "fit")
        if train_dataloaders is not None and datamodule is not None:
            raise MisconfigurationError("Pass either train_dataloaders or datamodule to fit(), not both.")
        self._run("fit", module, datamodule, lambda: self._fit(train_dataloaders, val_dataloaders, ckpt_path))

    def validate(self, module: LoopModule | None = None, dataloaders: Iterable | None = None,
                 datamodule: DataModule | None = None) -> list[dict[str, float]]:
        """One pass over the validation data; returns ``[logged epoch metrics]``."""
        return self._evaluate("validate", self.validate_loop, module, dataloaders, datamodule)

    def test(self, module: LoopModule | None = None, dataloaders: Iterable | None = None,
             datamodule: DataModule | None = None) -> list[dict[str, float]]:
        """One pass over the test data; returns ``[logged epoch metrics]``."""
        return self._evaluate("test", self.test_loop, module, dataloaders, datamodule)

    def predict(self, module: LoopModule | None = None, dataloaders: Iterable | None = None,
                datamodule: DataModule | None = None) -> list[Any]:
        """``predict_step``'s output for every batch, in order."""
        module = self._module_for("predict", module)

        def run() -> list[Any]:
            loader = self._prepare(self._dataloader("predict", dataloaders, datamodule), train=False)
            return self.predict_loop.run(loader, num_batches(loader, self.limit_predict_batches, "predict"))

        return self._run("predict", module, datamodule, run)

    # ------------------------------------------------------------ running
    def _run(self, stage: str, module: LoopModule, datamodule: DataModule | None, body: Any) -> Any:
        self.module = module
        self.datamodule = datamodule
        module.trainer = self
        self.hooks = Hooks(self, module, self.callbacks)
        # Per run, read at every step: whether resumable points have callbacks or writes to check.
        self._watch_resumable_points = self.hooks.overridden_by_callbacks("on_resumable_point")
        self._failure = None
        self._wrote_in_background = False
        self.control.start(self.world_size, catch_signals=stage == "fit")
        self.callback_metrics, self.logged_metrics, self.progress_bar_metrics = {}, {}, {}
        for loop in (self.fit_loop, self.validate_loop, self.test_loop, self.predict_loop):
            loop.trainer = self
            loop.clear_state()
        if self.seed is not None:
            seed_everything(self.seed)
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        status = "failed"
        try:
            self.strategy.setup_environment()
            if datamodule is not None:
                datamodule.setup(stage)
            self.hooks.module("setup", stage)
            self.hooks.callbacks("setup", stage)
            self.strategy.setup_module(module)
            out = body()
            self._agree_on_checkpoint_failures()
            status = "success"
            return out
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.hooks.callbacks("on_exception", exc)
            raise
        finally:
            self.control.finish()
            module.log_context.results = None
            self.strategy.wait_for_checkpoints()
            late = self.strategy.checkpoint_error()
            if late is not None:  # only when another error already ends the run: say it, do not hide that one
                print(f"distloop: also, a checkpoint write failed: {late}", file=sys.stderr)
            self.hooks.callbacks("teardown", stage)
            self.hooks.module("teardown", stage)
            if datamodule is not None:
                datamodule.teardown(stage)
            if self.is_global_zero:
                for lg in self.loggers:
                    lg.finalize(status)
            self.strategy.teardown()

    def _agree_on_checkpoint_failures(self) -> None:
        """At the end of a run: every rank learns whether a background checkpoint write failed
        anywhere (one collective, only after background writes), and all raise, so none goes on alone."""
        if not self._wrote_in_background:
            return
        self.strategy.wait_for_checkpoints()
        error = self.strategy.checkpoint_error() or self._failure
        if self.strategy.reduce_boolean_decision(error is not None, all=False):
            raise error if error is not None else CheckpointError(
                "Another rank could not write a checkpoint and stopped the run; its error says why.")

    def _fit(self, train_dataloaders: Iterable | None, val_dataloaders: Iterable | None, ckpt_path: str | None) -> None:
        assert self.module is not None
        self.train_dataloader = self._prepare(self._dataloader("train", train_dataloaders, self.datamodule), train=True)
        self.num_training_batches = num_batches(self.train_dataloader, self.limit_train_batches, "train")
        if val_dataloaders is None and self.datamodule is not None:
            val_dataloaders = self.datamodule.val_dataloader()
        if val_dataloaders is not None:
            val_dataloaders = self._prepare(val_dataloaders, train=False)
        self.val_dataloader = val_dataloaders
        self.num_val_batches = (
            num_batches(val_dataloaders, self.limit_val_batches, "val") if val_dataloaders is not None else 0)
        self.val_check_batches = val_check_batches(self.val_check_interval, self.num_training_batches)
        self.strategy.setup_optimizers(self.module)
        self.hooks("on_fit_start")
        self.ckpt_path = None
        if ckpt_path is not None:
            self._restore(ckpt_path)
        self.fit_loop.run()
        self.hooks("on_fit_end")

    def _evaluate(self, stage: str, loop: EvaluationLoop, module: LoopModule | None,
                  dataloaders: Iterable | None, datamodule: DataModule | None) -> list[dict[str, float]]:
        module = self._module_for(stage, module)

        def run() -> list[dict[str, float]]:
            loader = self._dataloader("val" if stage == "validate" else stage, dataloaders, datamodule)
            loader = self._prepare(loader, train=False)
            limit = num_batches(loader, self.limit_val_batches if stage == "validate" else self.limit_test_batches,
                                stage)
            if stage == "validate":
                self.val_dataloader, self.num_val_batches = loader, limit
            return [loop.run(loader, limit) or {}]

        return self._run(stage, module, datamodule, run)

    def _module_for(self, stage: str, module: LoopModule | None) -> LoopModule:
        module = module if module is not None else self.module
        if module is None:
            raise MisconfigurationError(f"trainer.{stage}() needs a module: pass one, or call fit() first.")
        _check_module(module, stage)
        return module

    def _dataloader(self, kind: str, given: Iterable | None, datamodule: DataModule | None) -> Iterable:
        if given is not None:
            return given
        if datamodule is not None:
            loader = getattr(datamodule, f"{kind}_dataloader")()
            if loader is not None:
                return loader
        where = "fit(module, train_dataloaders=...)" if kind == "train" else "the `dataloaders` argument"
        raise MisconfigurationError(f"No {kind} dataloader: pass one through {where} or a datamodule.")

    def _prepare(self, loader: Iterable, train: bool) -> Iterable:
        return prepare_loader(loader, num_replicas=self.world_size, rank=self.global_rank, seed=self.seed or 0,
                              train=train)

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    def checkpoint_dirs(self) -> list[str]:
        """Where ``ckpt_path="last"`` looks: each ModelCheckpoint's directory, then the default one."""
        dirs = [cb.dirpath for cb in self.checkpoint_callbacks if cb.dirpath]
        return dirs + [os.path.join(self.default_root_dir, "checkpoints")]

    def save_checkpoint(self, path: str, blocking: bool = True, then: Any = None) -> None:
        """Save the whole run (``run_state``) to ``path``. A collective: every rank calls it.

        With ``blocking=False`` training waits only for a copy of the state, and the file is
        written in the background (``then(path)`` runs once it is complete).
        """
        assert self.module is not None and self.hooks is not None
        self.strategy.check_all_ranks_here("Trainer.save_checkpoint")
        checkpoint = self.run_state.state_dict(self.global_step, self.current_epoch, self.world_size)
        self.hooks.module("on_save_checkpoint", checkpoint)
        self.strategy.save_checkpoint(checkpoint, path, blocking=blocking, then=then)
        if not blocking:  # on every rank alike (a collective): a failed write is agreed on later
            self._watch_resumable_points = self._wrote_in_background = True

    def _restore(self, ckpt_path: str) -> None:
        """Load a checkpoint into every part of ``run_state``; ``"last"``: the newest valid one."""
        assert self.module is not None and self.hooks is not None
        if ckpt_path == "last":
            found = self.strategy.newest_checkpoint(self.checkpoint_dirs())
            if found is None:
                if self.is_global_zero:
                    print(f"distloop: no checkpoint in {self.checkpoint_dirs()}; starting from scratch.",
                          file=sys.stderr)
                return
            ckpt_path = found
        self.ckpt_path = ckpt_path
        checkpoint = self.strategy.load_checkpoint(ckpt_path)
        self.hooks.module("on_load_checkpoint", checkpoint)  # before the parts, as in Lightning: it may edit them
        self.run_state.load_state_dict(checkpoint, ckpt_path)
        if self.is_global_zero:
            print(f"distloop: resumed from {ckpt_path} (epoch {self.current_epoch}, step {self.global_step})",
                  file=sys.stderr)

    def at_resumable_point(self) -> None:
        """After a whole optimizer step or epoch: callbacks may save here, and a preemption is honoured."""
        control = self.control
        if self._watch_resumable_points:
            assert self.hooks is not None
            self.hooks.callbacks("on_resumable_point")
            error = self.strategy.checkpoint_error()
            if error is not None:  # the ranks agree on it at the next metrics read, then all stop with it
                self._failure = error
                control.request(Request.FAIL)
        if not control.anything_decided:
            return  # the usual step: two tests
        if control.decided(Request.FAIL):
            raise self._failure if self._failure is not None else CheckpointError(
                "Another rank could not write a checkpoint and stopped the run; its error says why.")
        control.done_with(Request.SAVE)
        if control.decided(Request.PREEMPT):
            control.done_with(Request.PREEMPT)
            path = os.path.join(self.checkpoint_dirs()[0], f"preempted-step={self.global_step}.ckpt")
            self.save_checkpoint(path)
            if self.is_global_zero:
                print(f"distloop: stop requested; saved {path}. Exiting with code {PREEMPTED_EXIT_CODE} "
                      "(resume with ckpt_path='last').", file=sys.stderr, flush=True)
            raise Preempted(path)

    # ------------------------------------------------------------ used by the loops
    def read_metrics(self, results: ResultCollection, on_step: bool) -> dict[str, float]:
        """Read (and sync) logged values: the one place metrics reach callbacks, the bar and loggers.

        The read also carries this rank's control requests and brings back what the ranks agreed.
        """
        read = results.metrics(on_step, flags=self.control.pending)
        self.control.agree(read.flags)
        self.callback_metrics.update(read.callback)
        pbar, log = read.pbar, read.log
        if not pbar and not log:
            return {}
        values = torch.stack([v if v.dtype is torch.float32 and not v.ndim and not v.requires_grad
                              else v.detach().float().reshape(()) for v in [*pbar.values(), *log.values()]])
        floats = values.tolist()  # the one host sync of this read
        self.progress_bar_metrics.update(zip(pbar, floats[: len(pbar)]))
        scalars = dict(zip(log, floats[len(pbar):]))
        self.logged_metrics.update(log)
        self.metrics_version += 1
        if scalars and self.is_global_zero:
            record = {**scalars, "epoch": self.current_epoch}
            for lg in self.loggers:
                lg.log_metrics(record, step=self.global_step)
        return scalars

def _check_module(module: Any, stage: str) -> None:
    if not isinstance(module, LoopModule):
        raise MisconfigurationError(
            f"trainer.{stage}() takes a distloop.LoopModule; got {type(module).__name__}. "
            "Subclass LoopModule instead of nn.Module.")
    if stage == "fit":
        for hook in ("training_step", "configure_optimizers"):
            if getattr(type(module), hook) is getattr(LoopModule, hook):
                raise MisconfigurationError(
                    f"{type(module).__name__} does not define `{hook}`, which trainer.fit() needs.")
