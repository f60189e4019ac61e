"""Loops: the ``Loop`` contract and the loops the Trainer runs.

The whole of ``trainer.fit(module, ...)``, in order (``hook`` = the module's hook, then
every callback's that overrides it; "read" = ``Trainer.read_metrics``, where logged values
are synced across ranks, reach the loggers, the progress bar and ``callback_metrics``,
and where the ranks agree on the control plane's requests)::

    strategy.setup_environment(); datamodule.setup("fit"); setup("fit")   # module, then callbacks
    strategy.setup_module(module); strategy.setup_optimizers(module)
    hook on_fit_start
    restore the checkpoint if ckpt_path                # module.on_load_checkpoint, then run_state's parts
    fit_loop.run():
        sanity check (unless restarting): on_sanity_check_start, val_loop.run(few batches), on_sanity_check_end
        hook on_train_start
        while not fit_loop.done:                       # max_steps, max_epochs, or an agreed stop after min_epochs
            hook on_train_epoch_start
            epoch_loop.run(train_dataloader):          # data.set_epoch(loader, epoch, samples_seen)
                                                       # automatic or manual: module.automatic_optimization
                while not epoch_loop.done:             # last batch, max_steps, or an agreed stop
                    fetch a batch (to the device); hook on_train_batch_start (-1 ends the epoch)
                    AutomaticOptimization.run:
                        training_step (under autocast; through DDP's wrapper); nan_loss check
                        hook on_before_backward; backward; hook on_after_backward
                        unless accumulating: hook on_before_optimizer_step; clip; optimizer step;
                            hook on_before_zero_grad; zero_grad; step "step" LR schedulers
                    or ManualOptimization.run:         # accumulate_grad_batches=1, no gradient_clip_val
                        training_step (under autocast), where the module calls, as it likes:
                            self.manual_backward(loss): hook on_before_backward; backward (averaged
                                over the ranks under DDP); hook on_after_backward
                            self.clip_gradients(opt, ...)
                            opt.step(closure=None): closure; hook on_before_optimizer_step;
                                optimizer step (+1 global step); no LR scheduler is stepped for it
                            opt.zero_grad()
                    hook on_train_batch_end
                    every log_every_n_steps batches: read step values
                    maybe val_loop.run():              # val_check_interval / check_val_every_n_epoch
                        on_validation_start, on_validation_epoch_start,
                        per batch: on_validation_batch_start, validation_step, on_validation_batch_end
                        module on_validation_epoch_end; read epoch values; callbacks on_validation_epoch_end
                        on_validation_end
                    unless accumulating: resumable point
            module on_train_epoch_end; read epoch values; callbacks on_train_epoch_end
            step "epoch" LR schedulers; vote on should_stop (if a callback may have set it)
            resumable point
        hook on_train_end
    hook on_fit_end
    wait for background checkpoint writes; every rank raises if one failed anywhere (one vote)
    finally: teardown("fit") (callbacks, module); loggers finalize; strategy.teardown()

A resumable point (``Trainer.at_resumable_point``): callbacks ``on_resumable_point``
(``ModelCheckpoint`` saves here); a background write that failed becomes a FAIL request;
then what the ranks agreed on: a failure raises its error on every rank, a preemption
saves ``preempted-step=N.ckpt`` and exits with ``Preempted`` (code 75).
"""

from distloop.loops.evaluation import EvaluationLoop
from distloop.loops.fit import FitLoop
from distloop.loops.loop import Loop
from distloop.loops.manual_optimization import ManualOptimization
from distloop.loops.optimization import AutomaticOptimization
from distloop.loops.prediction import PredictionLoop
from distloop.loops.training_epoch import TrainingEpochLoop

__all__ = ["AutomaticOptimization", "EvaluationLoop", "FitLoop", "Loop", "ManualOptimization", "PredictionLoop",
           "TrainingEpochLoop"]
