"""Modules the launch tests point `model._target_` at (the ranks import this with PYTHONPATH=tests)."""

import os

from distloop.examples.digits import DigitsClassifier


class FailsOnRankOne(DigitsClassifier):
    """Raises in training_step on global rank 1 at batch 3."""

    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1 and batch_idx == 3:
            raise RuntimeError(f"boom on rank 1 (pid {os.getpid()})")
        return super().training_step(batch, batch_idx)
