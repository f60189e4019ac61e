"""Fit loop: epochs of training until a stop condition, with a sanity check of validation first."""

from __future__ import annotations

from distloop.loops.loop import Loop
from distloop.loops.training_epoch import TrainingEpochLoop
from distloop.optim import step_schedulers
from distloop.progress import Progress
from distloop.stages import RunningStage


class FitLoop(Loop):
    """``advance`` = one epoch: ``epoch_loop.run(train_dataloader)``, then the epoch-end hooks."""

    def __init__(self, min_epochs: int = 0, max_epochs: int = 1000, min_steps: int | None = None) -> None:
        super().__init__()
        self.min_epochs = min_epochs
        self.max_epochs = max_epochs
        self.min_steps = min_steps
        self.epoch_progress = Progress()
        self.epoch_loop = TrainingEpochLoop()

    def connect(self, epoch_loop: TrainingEpochLoop | None = None) -> None:
        if epoch_loop is not None:
            self.epoch_loop = epoch_loop

    @property
    def done(self) -> bool:
        trainer = self.trainer
        epochs = self.epoch_progress.current.processed
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            return True
        if self.max_epochs != -1 and epochs >= self.max_epochs:
            return True
        return trainer.stopping and self.can_stop_early

    @property
    def can_stop_early(self) -> bool:
        """Whether a stop (``should_stop``) may end training now: ``min_epochs`` and ``min_steps`` are reached."""
        trainer = self.trainer
        return self.epoch_progress.current.processed >= self.min_epochs and (
            self.min_steps is None or trainer.global_step >= self.min_steps)

    @property
    def skip(self) -> bool:
        return self.trainer.num_training_batches == 0

    def reset(self) -> None:
        if self.restarting:
            self.epoch_progress.reset_on_restart()

    def on_run_start(self) -> None:
        trainer = self.trainer
        if not self.restarting:
            self.run_sanity_check()
        trainer.state.stage = RunningStage.TRAINING
        trainer.hooks("on_train_start")

    def run_sanity_check(self) -> None:
        """A few validation batches before training, so a bug in validation fails fast."""
        trainer, val_loop = self.trainer, self.epoch_loop.val_loop
        steps = trainer.num_sanity_val_steps
        if steps == 0 or not trainer.has_validation:
            return
        trainer.state.stage = RunningStage.SANITY_CHECKING
        try:
            trainer.hooks.callbacks("on_sanity_check_start")
            val_loop.run(trainer.val_dataloaders, trainer.num_sanity_val_batches)
            trainer.hooks.callbacks("on_sanity_check_end")
        finally:
            trainer.state.stage = None
        val_loop.results.clear()

    def on_advance_start(self) -> None:
        trainer = self.trainer
        self.epoch_progress.increment_ready()
        trainer.hooks("on_train_epoch_start")
        trainer.strategy.sync_trainable_parameters()  # a fine-tuning callback may have unfrozen some
        self.epoch_progress.increment_started()

    def advance(self) -> None:
        self.epoch_loop.run(self.trainer.train_dataloader)

    def on_advance_end(self) -> None:
        trainer = self.trainer
        self.epoch_progress.increment_processed()
        trainer.epoch_end_reached(self.epoch_loop.results)
        trainer.hooks.callbacks("on_train_epoch_end", monitoring=False)  # Lightning's order, then one read
        trainer.hooks.module("on_train_epoch_end")
        trainer.read_metrics(self.epoch_loop.results, on_step=False)
        trainer.hooks.callbacks("on_train_epoch_end", monitoring=True)
        if self.epoch_loop.epoch_finished and trainer.module.automatic_optimization:
            # plateau schedulers need this epoch's values; the others stepped after the epoch's last batch
            plateaus = [c for c in trainer.lr_scheduler_configs if c.reduce_on_plateau]
            step_schedulers(plateaus, "epoch", trainer.current_epoch + 1, lambda: trainer.callback_metrics)
        trainer.agree_stop("on_train_epoch_end")
        self.epoch_progress.increment_completed()
        # Between epochs the run can be resumed exactly; a checkpoint written here must hold
        # an epoch loop ready for the next epoch, not the finished one.
        self.epoch_loop.reset()
        trainer.at_resumable_point()

    def on_run_end(self) -> None:
        self.trainer.hooks("on_train_end")
