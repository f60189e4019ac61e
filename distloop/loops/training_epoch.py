"""Training-epoch loop: one pass over the training data, validating where configured."""

from __future__ import annotations

import math
import warnings
from typing import Any

from distloop.data import is_stateful, position_counter, resumes_mid_epoch, set_epoch
from distloop.loops.evaluation import EvaluationLoop
from distloop.loops.fetcher import BatchIterator, next_batch
from distloop.loops.loop import Loop
from distloop.loops.manual_optimization import ManualOptimization
from distloop.loops.optimization import AutomaticOptimization
from distloop.module import batch_size_of
from distloop.optim import step_schedulers
from distloop.progress import BatchProgress, OptimizationProgress
from distloop.results import ResultCollection


class TrainingEpochLoop(Loop):
    """``advance`` = one batch: forward, backward, maybe an optimizer step, maybe validation.

    After a whole optimizer step (and the validation it triggered) the run can be resumed
    exactly: that is where checkpoints are written and preemption is honoured.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batch_progress = BatchProgress()
        self.optim_progress = OptimizationProgress()
        self.results = ResultCollection(training=True)
        self.val_loop = EvaluationLoop("validate")
        self.automatic_optimization = AutomaticOptimization(self.optim_progress)
        self.manual_optimization = ManualOptimization(self.optim_progress)
        self.optimization: AutomaticOptimization | ManualOptimization = self.automatic_optimization  # this run's
        self.samples_seen = 0  # global: summed over ranks, the data position within the epoch
        self._accumulating = False
        self._batches: BatchIterator | None = None
        self._count = position_counter(None, 1)  # per epoch: how far a batch moves the data position
        self._validates = False

    def connect(self, val_loop: EvaluationLoop | None = None) -> None:
        if val_loop is not None:
            self.val_loop = val_loop

    def _select_optimization(self) -> AutomaticOptimization | ManualOptimization:
        """Per run, as the module says: Lightning's automatic or manual optimization."""
        trainer = self.trainer
        if trainer.module.automatic_optimization:
            return self.automatic_optimization
        self.manual_optimization.connect(trainer)
        return self.manual_optimization

    @property
    def done(self) -> bool:
        trainer = self._trainer
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        return self.batch_progress.is_last_batch or (trainer.stopping and trainer.fit_loop.can_stop_early)

    def reset(self) -> None:
        self.optimization = self._select_optimization()
        if self.restarting:
            self.batch_progress.reset_on_restart()
            self.optim_progress.reset_on_restart()
        else:
            self.batch_progress.reset_on_run()
            self.optim_progress.reset_on_run()
            self.results.clear()
            self.samples_seen = 0

    def on_run_start(self, dataloader: Any) -> None:
        trainer = self.trainer
        self.results.device = trainer.strategy.root_device
        self.results.sync_fn = trainer.metrics_sync_fn
        trainer.module.log_context.results = self.results
        self._validates = trainer.has_validation
        if self.restarting and self.samples_seen and not resumes_mid_epoch(dataloader):
            warnings.warn(f"Resuming in the middle of an epoch ({self.samples_seen} samples in), but the training data "
                          "is not a DataLoader distloop can position (an IterableDataset not wrapped in "
                          "distloop.data.ShardedIterable, a sampler without set_epoch/state_dict/generator, or "
                          "use_distributed_sampler=False) and keeps no state of its own: the epoch's data starts "
                          "again from its beginning.",
                          stacklevel=2)
        set_epoch(dataloader, trainer.current_epoch, self.samples_seen)
        self._count = position_counter(dataloader, trainer.world_size)
        done = self.batch_progress.current.completed
        # The whole epoch: the loader's length, which a positioned loader shortens by what was trained
        # on; a loader that keeps its own state keeps its whole length, so the batches done are taken off.
        whole = type(trainer.limit_train_batches) is float and trainer.limit_train_batches == 1.0  # not the int 1
        limit = math.inf if whole and not is_stateful(dataloader) else trainer.num_training_batches - done
        self._batches = BatchIterator(dataloader, limit)

    def advance(self, dataloader: Any) -> None:
        batch, batch_idx = self.fetch_batch()
        trainer, progress = self._trainer, self.batch_progress
        if trainer.hooks("on_train_batch_start", batch, batch_idx) == -1:
            raise StopIteration  # Lightning's convention: -1 skips the rest of the epoch
        progress.increment_started()
        self._accumulating = (batch_idx + 1) % trainer.accumulate_grad_batches != 0 and not progress.is_last_batch
        outputs = self.optimization.run(trainer, batch, batch_idx, self._accumulating)
        progress.increment_processed()
        if progress.is_last_batch and trainer.lr_scheduler_configs:  # Lightning: before the batch-end hooks
            self.step_epoch_schedulers()
        trainer.hooks("on_train_batch_end", outputs, batch, batch_idx)
        progress.increment_completed()
        if progress.total.completed % trainer.log_every_n_steps == 0:
            trainer.read_metrics(self.results, on_step=True)

    def fetch_batch(self) -> tuple[Any, int]:
        """The next batch, on the device, counted as ready; ``StopIteration`` when the epoch's data ends."""
        assert self._batches is not None
        trainer = self._trainer
        batch, batch_idx = next_batch(self._batches, self.batch_progress, trainer.strategy)
        size = batch_size_of(batch)
        self.samples_seen += self._count(size)
        ctx = trainer.module.log_context
        ctx.batch, ctx.batch_size = batch, size
        return batch, batch_idx

    def on_advance_end(self) -> None:
        trainer = self._trainer
        if self._validates and self.should_validate():
            self.val_loop.run(trainer.val_dataloaders, trainer.num_val_batches)
            trainer.module.log_context.results = self.results
        if not self._accumulating:
            trainer.at_resumable_point()

    @property
    def epoch_finished(self) -> bool:
        """Whether the epoch ran all its batches (not cut short by a stop or ``max_steps``)."""
        return self.batch_progress.is_last_batch

    def step_epoch_schedulers(self) -> None:
        """The epoch-interval schedulers, except ``ReduceLROnPlateau`` (the fit loop steps those once the
        epoch's values are read)."""
        trainer = self.trainer
        if not trainer.module.automatic_optimization:  # Lightning: manual optimization steps its own schedulers
            return
        configs = [c for c in trainer.lr_scheduler_configs if not c.reduce_on_plateau]
        step_schedulers(configs, "epoch", trainer.current_epoch + 1, lambda: trainer.callback_metrics)

    def loader_state(self) -> Any:
        """A training loader that keeps its own state (``data.is_stateful``): that state after the
        batches trained on, for the checkpoint's ``data`` part."""
        if self._batches is not None:
            return self._batches.source_state()
        return self.trainer.train_dataloader.state_dict()

    def on_save_checkpoint(self) -> dict:
        return {"samples_seen": self.samples_seen}

    def on_load_checkpoint(self, state_dict: dict) -> None:
        self.samples_seen = state_dict.get("samples_seen", 0)

    def should_validate(self) -> bool:
        """Whether the batch just trained ends with a validation pass (``val_check_interval``,
        ``check_val_every_n_epoch``); override it to validate on a schedule of your own."""
        trainer = self.trainer
        if (trainer.current_epoch + 1) % trainer.check_val_every_n_epoch != 0:
            return False
        interval = trainer.val_check_batches
        if interval is None:  # once per epoch, at its end
            return self.batch_progress.is_last_batch
        return self.batch_progress.current.completed % interval == 0
