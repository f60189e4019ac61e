"""Trainer: wires module, data, strategy, loops, callbacks and loggers, then runs a loop."""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from distloop.callbacks import Callback, ModelCheckpoint, ProgressBar
from distloop.checkpoint import FORMAT, VERSION, BackgroundWriter, CheckpointError, capture_rng, load, newest_valid
from distloop.checkpoint import restore_rng, snapshot, write_atomic
from distloop.data import ResumableSampler, with_resumable_sampler
from distloop.datamodule import DataModule
from distloop.errors import PREEMPTED_EXIT_CODE, MisconfigurationError, Preempted
from distloop.hooks import Hooks
from distloop.loggers import CSVLogger, Logger
from distloop.loops import EvaluationLoop, FitLoop, Loop, PredictionLoop
from distloop.module import LoopModule
from distloop.progress import BaseProgress
from distloop.results import ResultCollection
from distloop.strategies import Strategy, resolve_strategy

_NAN_POLICIES = ("raise", "skip", "ignore")
# Requests the ranks agree on inside each metrics read (each bit OR-ed over ranks).
_STOP_SIGNAL, _TIME_SAVE, _SHOULD_STOP = 1, 2, 4


@dataclass
class LRSchedulerConfig:
    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None


class Trainer:
    """Runs ``fit``, ``validate``, ``test`` and ``predict`` for a ``LoopModule``.

    Arguments mean what they mean in Lightning. ``nan_loss`` says what a non-finite loss
    does: ``"raise"`` (checked where metrics are read: every ``log_every_n_steps``
    batches and at epoch end, so no host sync per step), ``"skip"`` (checked every
    step, the batch is left out of the update) or ``"ignore"``.
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
        _check_int("max_epochs", max_epochs, minimum=-1)
        if max_epochs == 0:
            raise MisconfigurationError("max_epochs=0 trains nothing: use max_epochs >= 1, or -1 for no limit.")
        _check_int("min_epochs", min_epochs or 0, minimum=0)
        _check_int("max_steps", max_steps, minimum=-1)
        for name, limit in (("limit_train_batches", limit_train_batches), ("limit_val_batches", limit_val_batches),
                            ("limit_test_batches", limit_test_batches),
                            ("limit_predict_batches", limit_predict_batches)):
            _check_limit(name, limit)
        _check_interval(val_check_interval)
        _check_int("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
        _check_int("num_sanity_val_steps", num_sanity_val_steps, minimum=-1)
        _check_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
        _check_int("log_every_n_steps", log_every_n_steps, minimum=1)
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise MisconfigurationError(f"gradient_clip_val={gradient_clip_val} must be >= 0 (or None for no clipping).")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise MisconfigurationError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'.")
        if nan_loss not in _NAN_POLICIES:
            raise MisconfigurationError(f"nan_loss={nan_loss!r}: use one of {_NAN_POLICIES}.")

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
        self.loggers: list[Logger] = self._make_loggers(logger)

        self.fit_loop = FitLoop(min_epochs=min_epochs or 0, max_epochs=max_epochs)
        self.validate_loop = EvaluationLoop("validate")
        self.test_loop = EvaluationLoop("test")
        self.predict_loop = PredictionLoop()

        self.module: LoopModule | None = None
        self.datamodule: DataModule | None = None
        self.hooks: Hooks | None = None
        self.optimizer: Optimizer | None = None
        self.lr_scheduler_configs: list[LRSchedulerConfig] = []
        self.train_dataloader: Iterable | None = None
        self.val_dataloader: Iterable | None = None
        self.num_training_batches: float = math.inf
        self.num_val_batches: float = 0
        self.val_check_batches: int | None = None
        self.should_stop = False  # a request: ranks agree on it at the next metrics read
        self._stopping = False  # the agreed decision the loops act on
        self._single = True  # one process: a request is already a decision
        self.sanity_checking = False
        self.callback_metrics: dict[str, Tensor] = {}
        self.logged_metrics: dict[str, Tensor] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.metrics_version = 0
        self.config: dict[str, Any] | None = None  # the run's resolved config, stored in checkpoints
        self._writer = BackgroundWriter()
        self._stop_requested = False  # set by SIGTERM / SIGUSR1
        self._agreed_flags = 0
        self._checkpoints: list[ModelCheckpoint] = []  # per run: read at every step
        self._timed: list[ModelCheckpoint] = []

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
    def stopping(self) -> bool:
        """Whether the loops stop: ``should_stop`` once every rank has agreed on it."""
        return self.should_stop if self._single else self._stopping

    def stop(self) -> None:
        """Stop at once. Only for a decision every rank makes alike (e.g. after
        ``strategy.reduce_boolean_decision``); otherwise set ``should_stop``, which the ranks
        agree on at the next metrics read."""
        self.should_stop = self._stopping = True

    def agree_stop(self, hook: str) -> None:
        """After callbacks' ``hook``: vote on ``should_stop``, only if a callback could have set it since the last read."""
        assert self.hooks is not None
        if not self._single and self.hooks.may_set_should_stop(hook):
            if self.strategy.reduce_boolean_decision(self.should_stop, all=False):
                self.stop()

    @property
    def max_epochs(self) -> int:
        return self.fit_loop.max_epochs

    @property
    def log_dir(self) -> str:
        return self.loggers[0].log_dir if self.loggers else self.default_root_dir

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
            limit = _num_batches(loader, self.limit_predict_batches, "predict")
            return self.predict_loop.run(loader, limit)

        return self._run("predict", module, datamodule, run)

    # ------------------------------------------------------------ running
    def _run(self, stage: str, module: LoopModule, datamodule: DataModule | None, body: Any) -> Any:
        self.module = module
        self.datamodule = datamodule
        module.trainer = self
        self.hooks = Hooks(self, module, self.callbacks)
        self._checkpoints = self.checkpoint_callbacks
        self._timed = [cb for cb in self._checkpoints if cb.train_time_interval is not None]
        self.should_stop = self._stopping = False
        self._single = self.world_size == 1
        self.callback_metrics, self.logged_metrics, self.progress_bar_metrics = {}, {}, {}
        for loop in (self.fit_loop, self.validate_loop, self.test_loop, self.predict_loop):
            loop.trainer = self
            _fresh_state(loop)
        if self.seed is not None:
            seed_everything(self.seed)
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        status = "failed"
        previous_handlers = self._catch_stop_signals() if stage == "fit" else {}
        try:
            self.strategy.setup_environment()
            if datamodule is not None:
                datamodule.setup(stage)
            self.hooks.module("setup", stage)
            self.hooks.callbacks("setup", stage)
            self.strategy.setup_module(module)
            out = body()
            status = "success"
            return out
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.hooks.callbacks("on_exception", exc)
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            module._ctx.results = None
            self._writer.wait()
            self.hooks.callbacks("teardown", stage)
            self.hooks.module("teardown", stage)
            if datamodule is not None:
                datamodule.teardown(stage)
            if self.is_global_zero:
                for lg in self.loggers:
                    lg.finalize(status)
            self.strategy.teardown()

    def _fit(self, train_dataloaders: Iterable | None, val_dataloaders: Iterable | None, ckpt_path: str | None) -> None:
        assert self.module is not None
        self.train_dataloader = self._prepare(self._dataloader("train", train_dataloaders, self.datamodule), train=True)
        self.num_training_batches = _num_batches(self.train_dataloader, self.limit_train_batches, "train")
        if val_dataloaders is None and self.datamodule is not None:
            val_dataloaders = self.datamodule.val_dataloader()
        if val_dataloaders is not None:
            val_dataloaders = self._prepare(val_dataloaders, train=False)
        self.val_dataloader = val_dataloaders
        self.num_val_batches = (
            _num_batches(val_dataloaders, self.limit_val_batches, "val") if val_dataloaders is not None else 0)
        self.val_check_batches = self._val_check_batches()
        self.optimizer, self.lr_scheduler_configs = _parse_optimizers(self.module.configure_optimizers())
        self.hooks("on_fit_start")
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
            limit = _num_batches(loader, self.limit_val_batches if stage == "validate" else self.limit_test_batches,
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
        """Shard across ranks with a resumable sampler (training data always: it makes resume exact)."""
        if not train and self.world_size == 1:
            return loader
        return with_resumable_sampler(loader, num_replicas=self.world_size, rank=self.global_rank,
                                      seed=self.seed or 0, train=train)

    def _val_check_batches(self) -> int | None:
        interval = self.val_check_interval
        if isinstance(interval, float):
            if interval == 1.0:
                return None
            if math.isinf(self.num_training_batches):
                raise MisconfigurationError(
                    f"val_check_interval={interval} is a fraction of an epoch, but the training data has no "
                    "length: pass an int (every N batches) instead.")
            return max(1, int(self.num_training_batches * interval))
        return interval

    def run_sanity_check(self, val_loop: EvaluationLoop) -> None:
        """A few validation batches before training, so a bug in validation fails fast."""
        steps = self.num_sanity_val_steps
        if steps == 0 or self.val_dataloader is None or self.num_val_batches == 0:
            return
        assert self.hooks is not None
        self.sanity_checking = True
        try:
            self.hooks.callbacks("on_sanity_check_start")
            val_loop.run(self.val_dataloader, self.num_val_batches if steps == -1 else min(steps, self.num_val_batches))
            self.hooks.callbacks("on_sanity_check_end")
        finally:
            self.sanity_checking = False
        val_loop.results.clear()

    # ------------------------------------------------------------ checkpoints
    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    def checkpoint_dirs(self) -> list[str]:
        """Where ``ckpt_path="last"`` looks: each ModelCheckpoint's directory, then the default one."""
        dirs = [cb.dirpath for cb in self.checkpoint_callbacks if cb.dirpath]
        return dirs + [os.path.join(self.default_root_dir, "checkpoints")]

    def save_checkpoint(self, path: str, blocking: bool = True, then: Any = None) -> None:
        """Save the whole run to ``path``. A collective: every rank calls it; global rank zero writes.

        With ``blocking=False`` training waits only for a copy of the state, and the file is
        written in the background (``then(path)`` runs once it is complete).
        """
        assert self.module is not None
        self.strategy.check_all_ranks_here("Trainer.save_checkpoint")
        loops = {"fit_loop": self.fit_loop.state_dict()}  # syncs logged values: a collective
        rng = self.strategy.gather_object(capture_rng())
        if self.is_global_zero:
            state: dict[str, Any] = {
                "format": FORMAT,
                "version": VERSION,
                "global_step": self.global_step,
                "epoch": self.current_epoch,
                "world_size": self.world_size,
                "module": self.strategy.module_state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "lr_schedulers": [c.scheduler.state_dict() for c in self.lr_scheduler_configs],
                "precision": self.strategy.precision.state_dict(),
                "loops": loops,
                "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
                "rng": rng,
                "config": self.config,
            }
            assert self.hooks is not None
            self.hooks.module("on_save_checkpoint", state)
            if blocking:
                self._writer.wait()
                write_atomic(state, path)
                if then is not None:
                    then(path)
            else:
                self._writer.submit(snapshot(state), path, then)
        if blocking:
            self.strategy.barrier()

    def _restore(self, ckpt_path: str) -> None:
        """Load a checkpoint into the module, optimizer, schedulers, callbacks, loops and RNGs."""
        assert self.module is not None
        if ckpt_path == "last":
            found = None
            if self.is_global_zero:
                path, state, skipped = newest_valid(self.checkpoint_dirs())
                for note in skipped:
                    print(f"distloop: skipping a bad checkpoint: {note}", file=sys.stderr)
                found = path
            found = self.strategy.broadcast(found)
            if found is None:
                if self.is_global_zero:
                    print(f"distloop: no checkpoint in {self.checkpoint_dirs()}; starting from scratch.",
                          file=sys.stderr)
                return
            if not self.is_global_zero:
                state = load(found)
            ckpt_path = found
        else:
            state = load(ckpt_path)
        _check_module_state(self.module, state["module"], ckpt_path)
        self.strategy.load_module_state_dict(state["module"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"The optimizer state in {ckpt_path} does not fit this optimizer: {err}") from err
        if len(state["lr_schedulers"]) != len(self.lr_scheduler_configs):
            raise CheckpointError(f"{ckpt_path} holds {len(state['lr_schedulers'])} LR schedulers; "
                                  f"configure_optimizers() made {len(self.lr_scheduler_configs)}.")
        for config, sched_state in zip(self.lr_scheduler_configs, state["lr_schedulers"]):
            config.scheduler.load_state_dict(sched_state)
        self.strategy.precision.load_state_dict(state["precision"])
        for cb in self.callbacks:
            if cb.state_key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][cb.state_key])
        self.fit_loop.load_state_dict(state["loops"]["fit_loop"])
        assert self.hooks is not None
        self.hooks.module("on_load_checkpoint", state)
        if self.global_rank < len(state["rng"]):
            restore_rng(state["rng"][self.global_rank])
        if self.is_global_zero:
            print(f"distloop: resumed from {ckpt_path} (epoch {self.current_epoch}, step {self.global_step})",
                  file=sys.stderr)

    def at_resumable_point(self) -> None:
        """After a whole optimizer step or epoch: write the checkpoints that are due, honour a stop request."""
        if not (self._checkpoints or self._stop_requested or self._agreed_flags):
            return  # nothing can be due: the usual step costs one test
        if self._single:
            flags = self._local_flags()
        else:  # agreed at the last metrics read, inside its key check: no collective of its own
            flags, self._agreed_flags = self._agreed_flags, 0
        for cb in self._checkpoints:
            cb.save_if_due(self, time_agreed=bool(flags & _TIME_SAVE))
        if flags & _STOP_SIGNAL:
            path = os.path.join(self.checkpoint_dirs()[0], f"preempted-step={self.global_step}.ckpt")
            self.save_checkpoint(path)
            if self.is_global_zero:
                print(f"distloop: stop requested; saved {path}. Exiting with code {PREEMPTED_EXIT_CODE} "
                      "(resume with ckpt_path='last').", file=sys.stderr, flush=True)
            raise Preempted(path)

    def _local_flags(self) -> int:
        flags = (_STOP_SIGNAL if self._stop_requested else 0) | (_SHOULD_STOP if self.should_stop else 0)
        if self._timed and any(cb.time_due() for cb in self._timed):
            flags |= _TIME_SAVE
        return flags

    def _catch_stop_signals(self) -> dict[int, Any]:
        """SIGTERM (and SIGUSR1, SLURM's warning) ask for a checkpoint and a clean stop at the next step."""
        self._stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, frame: Any) -> None:
            self._stop_requested = True

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGTERM, signal.SIGUSR1)}

    # ------------------------------------------------------------ used by the loops
    def read_metrics(self, results: ResultCollection, on_step: bool) -> dict[str, float]:
        """Read (and sync) logged values: the one place metrics reach callbacks, the bar and loggers."""
        out = results.metrics(on_step, flags=self._local_flags())
        agreed = results.agreed_flags
        if agreed & _SHOULD_STOP:
            self.stop()
        self._agreed_flags |= agreed & (_STOP_SIGNAL | _TIME_SAVE)
        self.callback_metrics.update(out["callback"])
        pbar, log = out["pbar"], out["log"]
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

    def check_finite_loss(self, loss: Tensor | None) -> None:
        if self.nan_loss != "raise" or loss is None or bool(torch.isfinite(loss)):
            return
        raise FloatingPointError(
            f"The training loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}; "
            f"checked every {self.log_every_n_steps} batches and at epoch end). Lower the learning rate, set "
            "gradient_clip_val, or pass nan_loss='skip' to leave such batches out of the update."
        )

    def step_schedulers(self, interval: str) -> None:
        for config in self.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = self.global_step if interval == "step" else self.current_epoch + 1
            if count % config.frequency:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor = config.monitor or ""
                if monitor not in self.callback_metrics:
                    raise MisconfigurationError(
                        f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; logged: "
                        f"{sorted(self.callback_metrics)}. Set 'monitor' in the lr_scheduler dict.")
                config.scheduler.step(float(self.callback_metrics[monitor]))
            else:
                config.scheduler.step()

    def set_data_epoch(self, epoch: int, samples_seen: int = 0) -> None:
        """Point the training sampler at ``epoch``, past the ``samples_seen`` already trained on."""
        sampler = getattr(self.train_dataloader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(epoch, min(samples_seen, sampler.num_samples))
            return
        for holder in (sampler, getattr(self.train_dataloader, "batch_sampler", None), self.train_dataloader):
            if holder is not None and hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
                return

    # ------------------------------------------------------------ set-up helpers
    def _make_loggers(self, logger: bool | Logger | list[Logger] | None) -> list[Logger]:
        if logger is True:
            path = _next_version_dir(os.path.join(self.default_root_dir, "logs"))
            if self.is_global_zero:
                os.makedirs(path, exist_ok=True)  # so the next Trainer takes the next version
            return [CSVLogger(path)]
        if not logger:
            return []
        loggers = [logger] if isinstance(logger, Logger) else list(logger)
        for lg in loggers:
            if not isinstance(lg, Logger):
                raise MisconfigurationError(f"logger={lg!r} is not a distloop Logger (CSVLogger, TensorBoardLogger).")
        return loggers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fresh_state(loop: Loop) -> None:
    """Zero every progress tracker and forget every logged value in a loop tree."""
    loop._restarting = False
    for value in vars(loop).values():
        if isinstance(value, BaseProgress):
            value.reset()
        elif isinstance(value, ResultCollection):
            value.clear()
        elif isinstance(value, Loop):
            _fresh_state(value)


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


def _check_module_state(module: LoopModule, saved: dict[str, Tensor], path: str) -> None:
    """A clear list of what differs, before ``load_state_dict`` fails deep inside."""
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(f"{k}: checkpoint {tuple(saved[k].shape)} vs module {tuple(current[k].shape)}"
                    for k in set(current) & set(saved) if saved[k].shape != current[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing from the checkpoint: {missing}" if missing else "",
                 f"not in the module: {unexpected}" if unexpected else "",
                 f"other shapes: {shapes}" if shapes else ""]
        raise MisconfigurationError(f"{path} does not fit {type(module).__name__}: "
                                    + "; ".join(p for p in parts if p) + ".")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (-1 means no limit)" if minimum == -1 else ""
        raise MisconfigurationError(f"{name}={value!r} must be an int >= {minimum}{hint}.")


def _check_limit(name: str, limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise MisconfigurationError(f"{name}={limit!r}: pass a fraction (float in [0, 1]) or a number of batches (int).")
    if isinstance(limit, float) and not 0.0 <= limit <= 1.0:
        raise MisconfigurationError(f"{name}={limit} is a fraction and must be in [0, 1]; for a number of batches pass an int.")
    if isinstance(limit, int) and limit < 0:
        raise MisconfigurationError(f"{name}={limit} must be >= 0.")


def _check_interval(interval: Any) -> None:
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise MisconfigurationError(f"val_check_interval={interval!r}: pass a fraction of an epoch (float) or a number of batches (int).")
    if isinstance(interval, float) and not 0.0 < interval <= 1.0:
        raise MisconfigurationError(f"val_check_interval={interval} must be in (0, 1] as a fraction, or an int number of batches.")
    if isinstance(interval, int) and interval < 1:
        raise MisconfigurationError(f"val_check_interval={interval} must be >= 1 batches.")


def _num_batches(loader: Iterable, limit: int | float, what: str) -> float:
    try:
        n: float = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = math.inf
    if isinstance(limit, int):
        return min(n, limit)
    if math.isinf(n):
        if limit not in (0.0, 1.0):
            raise MisconfigurationError(
                f"limit_{what}_batches={limit} is a fraction, but the {what} data has no length: pass an int.")
        return 0 if limit == 0.0 else n
    return int(n * limit) if limit < 1.0 else n


def _parse_optimizers(config: Any) -> tuple[Optimizer, list[LRSchedulerConfig]]:
    schedulers: list[Any] = []
    if isinstance(config, dict):
        if "optimizer" not in config:
            raise MisconfigurationError("configure_optimizers() returned a dict without an 'optimizer' key.")
        optimizers = [config["optimizer"]]
        if config.get("lr_scheduler") is not None:
            schedulers = [config["lr_scheduler"]]
    elif isinstance(config, Optimizer):
        optimizers = [config]
    elif isinstance(config, (list, tuple)) and len(config) == 2 and isinstance(config[0], (list, tuple)):
        optimizers, schedulers = list(config[0]), list(config[1])
    elif isinstance(config, (list, tuple)):
        optimizers = list(config)
    else:
        raise MisconfigurationError(
            f"configure_optimizers() returned {type(config).__name__}: return an optimizer, "
            "([optimizer], [schedulers]) or {'optimizer': ..., 'lr_scheduler': ...}.")
    if len(optimizers) != 1 or not isinstance(optimizers[0], Optimizer):
        raise MisconfigurationError(
            f"Automatic optimization takes exactly one torch optimizer; configure_optimizers() gave "
            f"{len(optimizers)}. For several, replace the training-epoch loop (see the README).")
    return optimizers[0], [_scheduler_config(s) for s in schedulers]


def _scheduler_config(entry: Any) -> LRSchedulerConfig:
    if isinstance(entry, dict):
        if "scheduler" not in entry:
            raise MisconfigurationError("An lr_scheduler dict needs a 'scheduler' key.")
        config = LRSchedulerConfig(entry["scheduler"], entry.get("interval", "epoch"), entry.get("frequency", 1),
                                   entry.get("monitor"))
    else:
        config = LRSchedulerConfig(entry)
    if config.interval not in ("step", "epoch"):
        raise MisconfigurationError(f"lr_scheduler interval={config.interval!r}: use 'step' or 'epoch'.")
    if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and config.monitor is None:
        raise MisconfigurationError("ReduceLROnPlateau needs {'scheduler': ..., 'monitor': 'metric_name'}.")
    return config


def _next_version_dir(root: str) -> str:
    version = 0
    while os.path.exists(os.path.join(root, f"version_{version}")):
        version += 1
    return os.path.join(root, f"version_{version}")
