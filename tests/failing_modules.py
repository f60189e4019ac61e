"""Modules and callbacks the launch tests point `_target_` at (the ranks import this with PYTHONPATH=tests)."""

import os
import signal

from distloop import Callback
from distloop.examples.digits import DigitsClassifier


class FailsOnRankOne(DigitsClassifier):
    """Raises in training_step on global rank 1 at batch 3."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and batch_idx == 3:
            raise RuntimeError(f"boom on rank 1 (pid {os.getpid()})")
        return super().training_step(batch, batch_idx)


class KillAt(Callback):
    """SIGKILLs global rank ``rank`` after optimizer step ``step``, on the first attempt only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        if first_attempt and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
