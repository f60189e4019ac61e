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
from contextlib import ExitStack
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from distloop.arguments import check_trainer_arguments, val_check_batches
from distloop.callbacks import (Callback, EarlyStopping, ModelCheckpoint, ProgressBar, default_model_summary,
                                default_progress_bar)
from distloop.callbacks.model_summary import ModelSummary
from distloop.callbacks.timer import Timer
from distloop.control import Control, Request
from distloop.data import num_batches, prepare_loader, seed_workers
from distloop.datamodule import DataModule
from distloop.checkpoint import WEIGHTS_ONLY_PARTS, CheckpointError
from distloop.errors import PREEMPTED_EXIT_CODE, MisconfigurationError, Preempted
from distloop.hparams import merged_hparams
from distloop.hooks import Hooks
from distloop.loggers import Logger, agree_on_versions, resolve_loggers
from distloop.loops import EvaluationLoop, FitLoop, PredictionLoop
from distloop.loops.evaluation import loader_list, results_table
from distloop.loops.manual_optimization import check_manual_optimization
from distloop.module import LoopModule, overrides
from distloop.optim import LRSchedulerConfig
from distloop.rank_zero import rank_zero_warn
from distloop.results import ResultCollection
from distloop.rng import seed_everything, seeding_workers
from distloop.stages import RunningStage, TrainerFn, TrainerState, TrainerStatus
from distloop.state import MODULE_PARTS, trainer_state
from distloop.strategies import Strategy, resolve_strategy


class Trainer:
    """Runs ``fit``, ``validate``, ``test`` and ``predict`` for a ``LoopModule``.

    Arguments mean what they mean in Lightning, with its defaults. ``nan_loss`` (distloop's
    own) says what a non-finite loss does: ``"raise"`` (checked before every optimizer step,
    so no update is made from it; on CUDA without a host sync), ``"skip"`` (the batch is
    left out of the update: one host sync per step) or ``"ignore"``. ``seed`` seeds every
    run the same way (``seed_everything`` before each entry point).
    """

    def __init__(
        self,
        *,
        accelerator: str = "auto",
        strategy: str | Strategy = "auto",
        devices: int | str = "auto",
        num_nodes: int = 1,
        precision: str | int = "32",
        logger: bool | Logger | list[Logger] | None = True,
        callbacks: Callback | list[Callback] | None = None,
        fast_dev_run: int | bool = False,
        max_epochs: int | None = None,
        min_epochs: int | None = None,
        max_steps: int = -1,
        min_steps: int | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int = 1,
        num_sanity_val_steps: int | None = None,
        log_every_n_steps: int | None = None,
        enable_checkpointing: bool | None = None,
        enable_progress_bar: bool | None = None,
        enable_model_summary: bool | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
        deterministic: bool | str | None = None,
        benchmark: bool | None = None,
        inference_mode: bool = True,
        use_distributed_sampler: bool = True,
        profiler: Any = None,
        detect_anomaly: bool = False,
        barebones: bool = False,
        plugins: Any = None,
        sync_batchnorm: bool = False,
        reload_dataloaders_every_n_epochs: int = 0,
        overfit_batches: int | float = 0.0,
        max_time: Any = None,
        default_root_dir: str | os.PathLike | None = None,
        seed: int | None = None,
        nan_loss: str = "raise",
        resume_with_other_data: bool = False,
    ) -> None:
        if plugins:
            raise MisconfigurationError("Trainer(plugins=...) is not supported: pass `precision=` and a Strategy.")
        if reload_dataloaders_every_n_epochs:
            raise MisconfigurationError(
                "Trainer(reload_dataloaders_every_n_epochs=...) is not supported: the data position of an exact "
                "resume is kept by the loader distloop builds once per fit.")
        if overfit_batches:
            raise MisconfigurationError("Trainer(overfit_batches=...) is not supported: pass a small Subset of the "
                                        "training data as both train and val dataloaders, with shuffle=False.")
        if profiler is not None:
            rank_zero_warn(f"Trainer(profiler={profiler!r}): distloop has no profiler; running without one "
                           "(wrap `trainer.fit` in torch.profiler.profile to profile).")
        if barebones:
            for name, value in (("enable_checkpointing", enable_checkpointing), ("logger", logger if logger is not True
                                 else None), ("enable_progress_bar", enable_progress_bar),
                                ("enable_model_summary", enable_model_summary)):
                if value:
                    raise MisconfigurationError(f"Trainer(barebones=True) turns off {name}; do not also set it.")
            logger, enable_checkpointing, enable_progress_bar, enable_model_summary = False, False, False, False
        fast_dev_run = _fast_dev_run_batches(fast_dev_run)
        if fast_dev_run:  # Lightning's meaning: n batches of everything, one epoch, nothing written
            limit_train_batches = limit_val_batches = limit_test_batches = limit_predict_batches = fast_dev_run
            max_steps, max_epochs, num_sanity_val_steps, val_check_interval = fast_dev_run, 1, 0, 1.0
            logger = False
        limit_train_batches = 1.0 if limit_train_batches is None else limit_train_batches
        limit_val_batches = 1.0 if limit_val_batches is None else limit_val_batches
        limit_test_batches = 1.0 if limit_test_batches is None else limit_test_batches
        limit_predict_batches = 1.0 if limit_predict_batches is None else limit_predict_batches
        val_check_interval = 1.0 if val_check_interval is None else val_check_interval
        num_sanity_val_steps = 2 if num_sanity_val_steps is None else num_sanity_val_steps
        log_every_n_steps = 50 if log_every_n_steps is None else log_every_n_steps
        gradient_clip_algorithm = gradient_clip_algorithm or "norm"
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
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise MisconfigurationError(f"num_nodes={num_nodes!r} must be an int >= 1.")

        self.strategy = resolve_strategy(strategy, accelerator, devices, precision)
        self.num_nodes = num_nodes
        self.fast_dev_run = fast_dev_run
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
        self.benchmark = benchmark
        self.inference_mode = inference_mode
        self.use_distributed_sampler = use_distributed_sampler
        self.detect_anomaly = detect_anomaly
        self.sync_batchnorm = sync_batchnorm
        self.seed = seed
        self.nan_loss = nan_loss
        self.resume_with_other_data = resume_with_other_data  # a checkpoint's data fingerprint may differ

        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks or [])
        if enable_checkpointing is False and any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
            raise MisconfigurationError("Trainer(enable_checkpointing=False) but a ModelCheckpoint is in `callbacks`: "
                                        "remove one of them.")
        if enable_checkpointing is not False and not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
            callbacks.append(ModelCheckpoint())  # Lightning's default: the newest epoch-end checkpoint
        if max_time is not None:  # Lightning's shorthand for a step-interval Timer
            if any(isinstance(cb, Timer) for cb in callbacks):
                rank_zero_warn("Ignoring `Trainer(max_time=...)`: `callbacks` already holds a Timer.")
            else:
                callbacks.append(Timer(duration=max_time, interval="step"))
        if enable_model_summary is not False and not any(isinstance(cb, ModelSummary) for cb in callbacks):
            callbacks.append(default_model_summary())
        if enable_progress_bar is not False and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.append(default_progress_bar())
        self.callbacks: list[Callback] = _checkpoints_last(callbacks)
        self.loggers: list[Logger] = resolve_loggers(logger, self.default_root_dir, self.is_global_zero)

        self.fit_loop = FitLoop(min_epochs=min_epochs or 0, max_epochs=max_epochs, min_steps=min_steps)
        self.validate_loop = EvaluationLoop("validate")
        self.test_loop = EvaluationLoop("test")
        self.predict_loop = PredictionLoop()

        self.state = TrainerState()
        self.module: LoopModule | None = None
        self.datamodule: DataModule | None = None
        self.hooks: Hooks | None = None
        self.train_dataloader: Iterable | None = None
        self._val_loaders: list[Iterable] = []
        self._val_single = True
        self.test_dataloaders: Any = None
        self.predict_dataloaders: Any = None
        self.num_training_batches: float = math.inf
        self.num_val_batches: list[float] = []
        self._validates = False
        self.num_test_batches: list[float] = []
        self.num_predict_batches: list[float] = []
        self.val_check_batches: int | None = None
        self._callback_metrics: dict[str, Tensor] = {}
        self._epoch_end: ResultCollection | None = None  # an epoch end's values, until they are read
        self.logged_metrics: dict[str, Tensor] = {}
        self.progress_bar_metrics: dict[str, float] = {}
        self.metrics_version = 0
        self.config: dict[str, Any] | None = None  # the run's resolved config, stored in checkpoints
        self.ckpt_path: str | None = None  # the checkpoint the last run started from
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
    def node_rank(self) -> int:
        return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID", "0"))))

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def num_devices(self) -> int:
        return self.world_size // self.num_nodes if self.world_size % self.num_nodes == 0 else self.world_size

    @property
    def lightning_module(self) -> LoopModule | None:
        """Lightning's name for the module being run."""
        return self.module

    @property
    def model(self) -> LoopModule | None:
        return self.module

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
    def precision(self) -> str:
        return self.strategy.precision.precision

    @property
    def logger(self) -> Logger | None:
        """The first logger (Lightning's ``trainer.logger``), or ``None`` without loggers."""
        return self.loggers[0] if self.loggers else None

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
    def min_epochs(self) -> int:
        return self.fit_loop.min_epochs

    @property
    def val_dataloaders(self) -> Any:
        """The validation loader(s) of this run, prepared for its ranks: one, or a list as given."""
        if not self._val_loaders:
            return None
        return self._val_loaders[0] if self._val_single else list(self._val_loaders)

    @property
    def has_validation(self) -> bool:
        """Whether ``fit`` validates at all (a validation loader with batches to run, on some rank)."""
        return self._validates

    @property
    def num_sanity_val_batches(self) -> list[float]:
        steps = self.num_sanity_val_steps
        return [n if steps == -1 else min(steps, n) for n in self.num_val_batches]

    @property
    def estimated_stepping_batches(self) -> int | float:
        """How many optimizer steps ``fit`` takes (for OneCycleLR's ``total_steps``), as Lightning estimates it."""
        if self.train_dataloader is None:
            raise MisconfigurationError("trainer.estimated_stepping_batches is known once fit() has its training "
                                        "data: read it in configure_optimizers or later.")
        if self.max_steps != -1 and math.isinf(self.num_training_batches):
            return self.max_steps
        if math.isinf(self.num_training_batches) or self.max_epochs == -1:
            return self.max_steps if self.max_steps != -1 else math.inf
        steps = math.ceil(self.num_training_batches / self.accumulate_grad_batches) * max(self.max_epochs, 1)
        return min(steps, self.max_steps) if self.max_steps != -1 else steps

    @property
    def log_dir(self) -> str:
        return self.loggers[0].log_dir if self.loggers else self.default_root_dir

    # ------------------------------------------------------------ stages
    @property
    def training(self) -> bool:
        return self.state.stage == RunningStage.TRAINING

    @property
    def sanity_checking(self) -> bool:
        return self.state.stage == RunningStage.SANITY_CHECKING

    @property
    def validating(self) -> bool:
        return self.state.stage == RunningStage.VALIDATING

    @property
    def testing(self) -> bool:
        return self.state.stage == RunningStage.TESTING

    @property
    def predicting(self) -> bool:
        return self.state.stage == RunningStage.PREDICTING

    @property
    def interrupted(self) -> bool:
        return self.state.status == TrainerStatus.INTERRUPTED

    # ------------------------------------------------------------ metrics
    @property
    def callback_metrics(self) -> dict[str, Tensor]:
        """The latest value of everything logged: step values after every batch (rank-local unless
        ``sync_dist``, whose synced values are those of the last read), epoch values after each read."""
        results = self.module.log_context.results if self.module is not None else None
        if results is not None and results.training:
            self._callback_metrics.update(results.step_values())
        if self._epoch_end is not None:
            self._callback_metrics.update(self._epoch_end.local_epoch_values())
        return self._callback_metrics

    @callback_metrics.setter
    def callback_metrics(self, metrics: dict[str, Tensor]) -> None:
        self._callback_metrics = metrics

    # ------------------------------------------------------------ callbacks by kind
    @property
    def checkpoint_callback(self) -> ModelCheckpoint | None:
        """The first ModelCheckpoint (what ``ckpt_path="best"`` uses), or ``None``."""
        found = self.checkpoint_callbacks
        return found[0] if found else None

    @property
    def checkpoint_callbacks(self) -> list[ModelCheckpoint]:
        return [cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)]

    @property
    def early_stopping_callback(self) -> EarlyStopping | None:
        found = self.early_stopping_callbacks
        return found[0] if found else None

    @property
    def early_stopping_callbacks(self) -> list[EarlyStopping]:
        return [cb for cb in self.callbacks if isinstance(cb, EarlyStopping)]

    @property
    def progress_bar_callback(self) -> ProgressBar | None:
        return next((cb for cb in self.callbacks if isinstance(cb, ProgressBar)), None)

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
        model: LoopModule,
        train_dataloaders: Iterable | DataModule | None = None,
        val_dataloaders: Any = None,
        datamodule: DataModule | None = None,
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        """Train ``model``; every call starts from fresh progress, metrics and optimizers.

        Data comes from ``train_dataloaders`` (or a DataModule in its place), ``datamodule``,
        or the module's own ``train_dataloader()``. ``ckpt_path`` resumes a run exactly: a
        checkpoint file, ``"last"`` for the newest valid checkpoint in the checkpoint
        directories (a fresh start when there is none), or ``"best"``.
        """
        _check_module(model, "fit")
        if isinstance(train_dataloaders, DataModule):
            train_dataloaders, datamodule = None, _only_datamodule(train_dataloaders, datamodule)
        if (train_dataloaders is not None or val_dataloaders is not None) and datamodule is not None:
            raise MisconfigurationError("Pass either dataloaders or a datamodule to fit(), not both.")
        self._run(TrainerFn.FITTING, model, datamodule, ckpt_path,
                  lambda checkpoint: self._fit(train_dataloaders, val_dataloaders, checkpoint))

    def validate(self, model: LoopModule | None = None, dataloaders: Any = None,
                 ckpt_path: str | os.PathLike | None = None, verbose: bool = True,
                 datamodule: DataModule | None = None) -> list[dict[str, float]]:
        """One pass over the validation data; returns one dict of logged epoch metrics per dataloader."""
        return self._evaluate(TrainerFn.VALIDATING, model, dataloaders, ckpt_path, verbose, datamodule)

    def test(self, model: LoopModule | None = None, dataloaders: Any = None,
             ckpt_path: str | os.PathLike | None = None, verbose: bool = True,
             datamodule: DataModule | None = None) -> list[dict[str, float]]:
        """One pass over the test data; returns one dict of logged epoch metrics per dataloader."""
        return self._evaluate(TrainerFn.TESTING, model, dataloaders, ckpt_path, verbose, datamodule)

    def predict(self, model: LoopModule | None = None, dataloaders: Any = None,
                datamodule: DataModule | None = None, return_predictions: bool | None = None,
                ckpt_path: str | os.PathLike | None = None) -> list[Any] | None:
        """``predict_step``'s output for every batch, in order (a list per dataloader when there are several)."""
        module, dataloaders, datamodule = self._eval_inputs("predict", model, dataloaders, datamodule)
        ckpt_path = self._select_ckpt_path("predict", ckpt_path, model_given=model is not None)

        def run(checkpoint: dict[str, Any] | None) -> list[Any] | None:
            loaders, single = self._eval_loaders("predict", dataloaders, datamodule)
            self.predict_dataloaders = loaders[0] if single else loaders
            self.num_predict_batches = [num_batches(dl, self.limit_predict_batches, "predict") for dl in loaders]
            self._log_hyperparams()
            self.predict_loop.return_predictions = return_predictions is not False
            out = self.predict_loop.run(loaders, self.num_predict_batches)
            if return_predictions is False:
                return None
            return out[0] if len(out) == 1 else out

        return self._run(TrainerFn.PREDICTING, module, datamodule, ckpt_path, run)

    # ------------------------------------------------------------ running
    def _run(self, fn: TrainerFn, module: LoopModule, datamodule: DataModule | None,
             ckpt_path: str | os.PathLike | None, body: Any) -> Any:
        """Set up, restore what the checkpoint holds for ``fn``, run ``body``, tear down: Lightning's order."""
        self.state.fn, self.state.status, self.state.stage = fn, TrainerStatus.RUNNING, None
        self.module = module
        self.datamodule = datamodule
        module.trainer = self
        if datamodule is not None:
            datamodule.trainer = self
        self.hooks = Hooks(self, module, self.callbacks)
        # Per run, read at every step: whether resumable points have callbacks or writes to check.
        self._watch_resumable_points = self.hooks.overridden_by_callbacks("on_resumable_point")
        self._failure = None
        self._wrote_in_background = False
        self.control.start(self.world_size, catch_signals=fn == TrainerFn.FITTING)
        self._callback_metrics, self.logged_metrics, self.progress_bar_metrics = {}, {}, {}
        for loop in (self.fit_loop, self.validate_loop, self.test_loop, self.predict_loop):
            loop.trainer = self
            if loop is not self.fit_loop or fn == TrainerFn.FITTING:  # test() keeps the fit's global_step
                loop.clear_state()
        if self.seed is not None:
            seed_everything(self.seed, workers=seeding_workers(), verbose=False)
        self._set_determinism()
        status = TrainerStatus.INTERRUPTED
        stage = fn.value
        try:
            with ExitStack() as stack:
                if self.detect_anomaly and fn == TrainerFn.FITTING:
                    stack.enter_context(torch.autograd.detect_anomaly())
                self.strategy.setup_environment()
                agree_on_versions(self.loggers, self.strategy)
                self._prepare_data(module, datamodule)
                if datamodule is not None:
                    datamodule.setup(stage)
                self.hooks.callbacks("setup", stage)
                self.hooks.module("setup", stage)
                self.hooks.module("configure_model")
                if self.sync_batchnorm and self.world_size > 1:
                    torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
                self.strategy.setup_module(module)
                checkpoint = self._restore_module(fn, ckpt_path)
                out = body(checkpoint)
                self._agree_on_checkpoint_failures()
            status = TrainerStatus.FINISHED
            return out
        except BaseException as exc:
            self.hooks.callbacks("on_exception", exc)
            self.hooks.module("on_exception", exc)
            raise
        finally:
            self.state.status, self.state.stage = status, None
            self.control.finish()
            self._epoch_end = None
            module.log_context.results = None
            module.log_context.dataloader_idx = None
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
                    lg.finalize("success" if status == TrainerStatus.FINISHED else "failed")
            self.strategy.teardown()

    def _set_determinism(self) -> None:
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=self.deterministic == "warn")
        if self.benchmark is not None or self.deterministic:
            torch.backends.cudnn.benchmark = bool(self.benchmark) and not self.deterministic

    def _prepare_data(self, module: LoopModule, datamodule: DataModule | None) -> None:
        """``prepare_data`` (downloads, one-time preprocessing) once per node or once per job, then a barrier."""
        called = False
        for owner, base in ((datamodule, DataModule), (module, LoopModule)):
            if owner is None or not overrides(owner, base, "prepare_data"):
                continue
            per_node = getattr(owner, "prepare_data_per_node", True)
            if (self.local_rank == 0) if per_node else self.is_global_zero:
                owner.prepare_data()
            called = True
        if called and self.world_size > 1:
            self.strategy.barrier("prepare_data")

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

    def _fit(self, train_dataloaders: Iterable | None, val_dataloaders: Any,
             checkpoint: dict[str, Any] | None) -> None:
        module = self.module
        assert module is not None
        train = train_dataloaders if train_dataloaders is not None else self._source_loader("train", module)
        if train is None:
            raise MisconfigurationError(
                "No training data: pass fit(model, train_dataloaders=...), a datamodule, or define "
                f"`train_dataloader()` on {type(module).__name__}.")
        self.train_dataloader = self.prepare_dataloader(train, train=True)
        self.num_training_batches = num_batches(self.train_dataloader, self.limit_train_batches, "train")
        if val_dataloaders is None:
            val_dataloaders = self._source_loader("val", module)
        loaders, self._val_single = loader_list(val_dataloaders)
        self._val_loaders = [self.prepare_dataloader(dl, train=False) for dl in loaders]
        self.num_val_batches = [num_batches(dl, self.limit_val_batches, "val") for dl in self._val_loaders]
        # Whether fit validates must be the same on every rank (a small shard may have no batch on one).
        self._validates = self.strategy.reduce_boolean_decision(any(n != 0 for n in self.num_val_batches), all=False) \
            if self.world_size > 1 else any(n != 0 for n in self.num_val_batches)
        self.val_check_batches = val_check_batches(self.val_check_interval, self.num_training_batches)
        if self.num_training_batches < self.log_every_n_steps and not math.isinf(self.num_training_batches) \
                and self.loggers and self.is_global_zero:
            rank_zero_warn(f"The number of training batches ({self.num_training_batches:g}) is smaller than the logging "
                           f"interval Trainer(log_every_n_steps={self.log_every_n_steps}); loggers get step values only "
                           "every that many steps. Set a lower value to see them every epoch.")
        if not module.automatic_optimization:
            check_manual_optimization(self)
        self.strategy.setup_optimizers(module)
        self.hooks("on_fit_start")
        self._log_hyperparams()
        if checkpoint is not None:
            if "loops" not in checkpoint:
                raise CheckpointError(
                    f"{self.ckpt_path} holds the weights only (saved with save_weights_only=True): it cannot resume a "
                    "fit. Load it with YourModule.load_from_checkpoint(path), or pass it to validate/test/predict.")
            self.run_state.load_state_dict(checkpoint, self.ckpt_path or "", skip=MODULE_PARTS)
            if self.is_global_zero:
                print(f"distloop: resumed from {self.ckpt_path} (epoch {self.current_epoch}, step "
                      f"{self.global_step})", file=sys.stderr)
        self.fit_loop.run()
        self.hooks("on_fit_end")

    def _evaluate(self, fn: TrainerFn, model: LoopModule | None, dataloaders: Any, ckpt_path: Any,
                  verbose: bool, datamodule: DataModule | None) -> list[dict[str, float]]:
        kind = "val" if fn == TrainerFn.VALIDATING else "test"
        module, dataloaders, datamodule = self._eval_inputs(fn.value, model, dataloaders, datamodule)
        ckpt_path = self._select_ckpt_path(fn.value, ckpt_path, model_given=model is not None)
        loop = self.validate_loop if fn == TrainerFn.VALIDATING else self.test_loop
        limit = self.limit_val_batches if fn == TrainerFn.VALIDATING else self.limit_test_batches

        def run(checkpoint: dict[str, Any] | None) -> list[dict[str, float]]:
            loaders, single = self._eval_loaders(kind, dataloaders, datamodule)
            counts = [num_batches(dl, limit, kind) for dl in loaders]
            if fn == TrainerFn.VALIDATING:
                self._val_loaders, self._val_single, self.num_val_batches = loaders, single, counts
                self._validates = any(n != 0 for n in counts)
            else:
                self.test_dataloaders, self.num_test_batches = (loaders[0] if single else loaders), counts
            self._log_hyperparams()
            results = loop.run(loaders, counts)
            if verbose and self.is_global_zero:
                print(results_table(fn.value, results), file=sys.stdout, flush=True)
            return results

        return self._run(fn, module, datamodule, ckpt_path, run)

    def _eval_inputs(self, stage: str, model: LoopModule | None, dataloaders: Any,
                     datamodule: DataModule | None) -> tuple[LoopModule, Any, DataModule | None]:
        """The module to run (the one given, or the last one run) and where its data comes from."""
        if isinstance(model, DataModule):
            raise MisconfigurationError(f"trainer.{stage}() got a DataModule as `model`: pass "
                                        f"trainer.{stage}(model, datamodule=dm) or {stage}(datamodule=dm).")
        if isinstance(dataloaders, DataModule):
            dataloaders, datamodule = None, _only_datamodule(dataloaders, datamodule)
        if dataloaders is not None and datamodule is not None:
            raise MisconfigurationError(f"Pass either dataloaders or a datamodule to {stage}(), not both.")
        module = model if model is not None else self.module
        if module is None:
            raise MisconfigurationError(f"trainer.{stage}() needs a model: pass one, or call fit() first.")
        _check_module(module, stage)
        if model is None and dataloaders is None and datamodule is None:
            datamodule = self.datamodule  # Lightning reuses the fit's datamodule
        return module, dataloaders, datamodule

    def _eval_loaders(self, kind: str, given: Any, datamodule: DataModule | None) -> tuple[list[Iterable], bool]:
        assert self.module is not None
        source = given if given is not None else self._source_loader(kind, self.module)
        loaders, single = loader_list(source)
        if not loaders:
            stage = "validate" if kind == "val" else kind
            raise MisconfigurationError(
                f"No {kind} dataloader: pass trainer.{stage}(model, dataloaders=...), a datamodule with "
                f"`{kind}_dataloader()`, or define `{kind}_dataloader()` on {type(self.module).__name__}.")
        return [self.prepare_dataloader(dl, train=False) for dl in loaders], single

    def _source_loader(self, kind: str, module: LoopModule) -> Any:
        """``<kind>_dataloader()`` of the datamodule, else of the module; ``None`` when neither defines it."""
        name = f"{kind}_dataloader"
        for owner, base in ((self.datamodule, DataModule), (module, LoopModule)):
            if owner is not None and overrides(owner, base, name):
                return getattr(owner, name)()
        return None

    def prepare_dataloader(self, loader: Iterable, train: bool = True) -> Iterable:
        """``loader`` as ``fit`` uses it: sharded over the ranks by a resumable sampler that records
        the data position (``use_distributed_sampler``), workers seeded per rank and epoch. A loop
        that trains on a loader of its own prepares it here, so the loader resumes exactly."""
        if self.use_distributed_sampler:
            seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))
            loader = prepare_loader(loader, num_replicas=self.world_size, rank=self.global_rank, seed=seed,
                                    train=train)
        return seed_workers(loader, self.global_rank)

    def _log_hyperparams(self) -> None:
        """The module's and datamodule's saved hyperparameters to every logger, as Lightning does at each
        run, after the run's config when there is one (the command's). Called once the loggers' state is
        restored, so a tracker continuing a run gets them in that run."""
        assert self.module is not None
        params = merged_hparams(self.module, self.datamodule)  # on every rank: a clash raises on all of them
        if not self.is_global_zero:
            return
        for lg in self.loggers:
            if self.config:
                lg.log_hyperparams(self.config)
            if params:
                lg.log_hyperparams(params)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_dirs(self) -> list[str]:
        """Where ``ckpt_path="last"`` looks: each ModelCheckpoint's directory, then the default one."""
        dirs = [cb.dirpath for cb in self.checkpoint_callbacks if cb.dirpath]
        default = os.path.join(self.default_root_dir, "checkpoints")
        return dirs + ([default] if default not in dirs else [])

    def save_checkpoint(self, filepath: str | os.PathLike, weights_only: bool = False, blocking: bool = True,
                        then: Any = None) -> None:
        """Save the whole run (``run_state``) to ``filepath``; ``weights_only``: the module and its
        hyperparameters. A collective: every rank calls it.

        With ``blocking=False`` training waits only for a copy of the state, and the file is
        written in the background (``then(path)`` runs once it is complete).
        """
        assert self.module is not None and self.hooks is not None
        path = os.fspath(filepath)
        self.strategy.check_all_ranks_here("Trainer.save_checkpoint")
        checkpoint = self.run_state.state_dict(self.global_step, self.current_epoch, self.world_size,
                                               only=WEIGHTS_ONLY_PARTS if weights_only else None)
        self.hooks.callbacks("on_save_checkpoint", checkpoint)
        self.hooks.module("on_save_checkpoint", checkpoint)
        self.strategy.save_checkpoint(checkpoint, path, blocking=blocking, then=then)
        if not blocking:  # on every rank alike (a collective): a failed write is agreed on later
            self._watch_resumable_points = self._wrote_in_background = True

    def _select_ckpt_path(self, stage: str, ckpt_path: Any, model_given: bool) -> str | None:
        """Lightning's rule for validate/test/predict: without a model and a path, the fit's best checkpoint."""
        if ckpt_path is None and not model_given and self.module is not None:
            if self.checkpoint_callback is not None and self.checkpoint_callback.best_model_path:
                rank_zero_warn(f"`.{stage}(ckpt_path=None)` was called without a model: the best model of the previous "
                               f"`fit` call is used. Pass `{stage}(ckpt_path='best')` or 'last' to silence this.")
                return "best"
            return None
        return None if ckpt_path is None else os.fspath(ckpt_path)

    def _resolve_ckpt_path(self, stage: str, ckpt_path: str) -> str | None:
        if ckpt_path == "best":
            callback = self.checkpoint_callback
            if callback is None:
                raise MisconfigurationError(f'`.{stage}(ckpt_path="best")` needs a ModelCheckpoint callback.')
            if len(self.checkpoint_callbacks) > 1:
                rank_zero_warn(f'`.{stage}(ckpt_path="best")` with several ModelCheckpoint callbacks: the first one\'s '
                               "best checkpoint is used.")
            if not callback.best_model_path:
                raise MisconfigurationError(f'`.{stage}(ckpt_path="best")`: the ModelCheckpoint has saved no '
                                            "checkpoint yet (run fit first, or pass a path).")
            return callback.best_model_path
        if ckpt_path == "last":
            self.strategy.wait_for_checkpoints()
            found = self.strategy.newest_checkpoint(self.checkpoint_dirs())
            if found is None and self.is_global_zero:
                print(f"distloop: no checkpoint in {self.checkpoint_dirs()}; starting from scratch.", file=sys.stderr)
            return found
        return ckpt_path

    def _restore_module(self, fn: TrainerFn, ckpt_path: Any) -> dict[str, Any] | None:
        """Read ``ckpt_path`` and restore what comes before ``on_fit_start`` in Lightning: the module's
        weights, and for ``fit`` the callbacks' states. Returns the checkpoint for the rest."""
        assert self.module is not None and self.hooks is not None
        self.ckpt_path = None
        if ckpt_path is None:
            return None
        path = self._resolve_ckpt_path(fn.value, os.fspath(ckpt_path))
        if path is None:
            return None
        self.ckpt_path = path
        checkpoint = self.strategy.load_checkpoint(path)
        self.hooks.module("on_load_checkpoint", checkpoint)  # before the parts, as in Lightning: it may edit them
        parts = MODULE_PARTS if fn == TrainerFn.FITTING else ("state_dict",)
        if fn == TrainerFn.FITTING:
            self.hooks.callbacks("on_load_checkpoint", checkpoint)
        self.run_state.load_state_dict(checkpoint, path, only=parts)
        return checkpoint

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
    def read_metrics(self, results: ResultCollection, on_step: bool, log: bool = True) -> dict[str, float]:
        """Read (and sync) logged values: the one place metrics reach callbacks, the bar and loggers.

        The read also carries this rank's control requests and brings back what the ranks agreed.
        ``log=False`` refreshes ``callback_metrics`` only (a monitor's read between logging steps).
        """
        if results.training and not on_step:
            self._callback_metrics.update(results.step_values())  # the last step's values, then the epoch's
        if not on_step:
            self._epoch_end = None
        read = results.metrics(on_step, flags=self.control.pending)
        self.control.agree(read.flags)
        self._callback_metrics.update(read.callback)
        if not log:
            return {}
        pbar, log_values = read.pbar, read.log
        if not pbar and not log_values:
            return {}
        values = torch.stack([v if v.dtype is torch.float32 and not v.ndim and not v.requires_grad
                              else v.detach().float().reshape(()) for v in [*pbar.values(), *log_values.values()]])
        floats = values.tolist()  # the one host sync of this read
        self.progress_bar_metrics.update(zip(pbar, floats[: len(pbar)]))
        scalars = dict(zip(log_values, floats[len(pbar):]))
        self.logged_metrics.update(log_values)
        self.metrics_version += 1
        if scalars and self.is_global_zero:
            record = dict(scalars)
            record.setdefault("epoch", self.current_epoch)  # as Lightning: a logged "epoch" or "step" wins
            step = int(record.pop("step", self.global_step))
            for lg in self.loggers:
                lg.log_metrics(record, step=step)
                lg.save()
        return scalars

    def epoch_end_reached(self, results: ResultCollection | None) -> None:
        """An epoch ends: until its values are read, ``callback_metrics`` shows this rank's epoch
        values of ``results`` (Lightning's callbacks see them in the epoch-end hooks before the read)."""
        self._epoch_end = results

    def sync_step_metric(self, name: str) -> None:
        """Bring a ``sync_dist`` step value in ``callback_metrics`` up to date for a monitor, at a
        step every rank reaches alike (a collective there, none elsewhere)."""
        results = self.module.log_context.results if self.module is not None else None
        if results is not None and results.training and results.is_synced_step_value(name):
            self.read_metrics(results, on_step=True, log=False)


def _fast_dev_run_batches(fast_dev_run: int | bool) -> int:
    if fast_dev_run is True:
        return 1
    if fast_dev_run is False:
        return 0
    if isinstance(fast_dev_run, int) and fast_dev_run >= 0:
        return fast_dev_run
    raise MisconfigurationError(f"fast_dev_run={fast_dev_run!r}: pass a bool or an int >= 0 (batches per stage).")


def _checkpoints_last(callbacks: list[Callback]) -> list[Callback]:
    """Checkpoint callbacks after the others, as Lightning orders them, so a checkpoint holds their
    states after their hooks of the same step."""
    return [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)] + \
        [cb for cb in callbacks if isinstance(cb, ModelCheckpoint)]


def _only_datamodule(given: DataModule, datamodule: DataModule | None) -> DataModule:
    if datamodule is not None and datamodule is not given:
        raise MisconfigurationError("Two datamodules were passed (one positionally, one as datamodule=): pass one.")
    return given


# Lightning hooks distloop does not call, and what does their job here: silently skipping one
# would change what the module computes.
_NOT_CALLED = {
    "optimizer_step": "warm the learning rate up with an LR scheduler (e.g. LambdaLR, interval 'step'), or use "
                      "manual optimization",
    "lr_scheduler_step": "return a torch LR scheduler from configure_optimizers, or use manual optimization",
    "configure_gradient_clipping": "pass Trainer(gradient_clip_val=...), or clip in on_before_optimizer_step",
    "transfer_batch_to_device": "return tensors (or lists, tuples, dicts of them) from the loader; the strategy "
                                "moves them",
    "on_before_batch_transfer": "transform the batch in the loader's collate_fn",
    "on_after_batch_transfer": "transform the batch at the start of the step",
}


def _check_module(module: Any, stage: str) -> None:
    if not isinstance(module, LoopModule):
        raise MisconfigurationError(
            f"trainer.{stage}() takes a distloop.LoopModule; got {type(module).__name__}. "
            "Subclass LoopModule instead of nn.Module (or of LightningModule).")
    for hook, instead in _NOT_CALLED.items():
        if getattr(type(module), hook, None) is not None:
            raise MisconfigurationError(
                f"{type(module).__name__} overrides the Lightning hook `{hook}`, which distloop does not call: "
                f"{instead}.")
    if stage == "fit":
        for hook in ("training_step", "configure_optimizers"):
            if not overrides(module, LoopModule, hook):
                raise MisconfigurationError(
                    f"{type(module).__name__} does not define `{hook}`, which trainer.fit() needs.")
