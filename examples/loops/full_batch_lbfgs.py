"""Loop cookbook: full-batch L-BFGS.

L-BFGS evaluates its closure several times per step (a line search), each time over the
whole training set. The epoch loop below turns an epoch into one optimizer step: it fetches
every batch of the epoch (through ``fetch_batch``, so the data position and the progress
counters stay exact), then runs ``training_step`` once on the list of batches. The module
uses manual optimization, so ``optimizer.step(closure)`` counts as the global step.

Under DDP every rank holds its shard; ``manual_backward`` averages the gradients and the
closure returns the loss averaged over the ranks, so the line search takes the same
decisions on every rank.

    python examples/loops/full_batch_lbfgs.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/full_batch_lbfgs.py [ROOT]
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop
from distloop.loops import TrainingEpochLoop


class FullBatchEpochLoop(TrainingEpochLoop):
    """``advance`` = the whole epoch: every batch fetched, then one ``training_step`` over all of them."""

    def advance(self, dataloader: Any) -> None:
        trainer, progress = self.trainer, self.batch_progress
        batches = [self.fetch_batch()[0]]
        while not progress.is_last_batch:
            batches.append(self.fetch_batch()[0])
        for _ in batches:
            progress.increment_started()
        outputs = self.optimization.run(trainer, batches, 0, accumulating=False)
        for _ in batches:
            progress.increment_processed()
        trainer.hooks("on_train_batch_end", outputs, batches, 0)
        for _ in batches:
            progress.increment_completed()
        trainer.read_metrics(self.results, on_step=True)


class LeastSquares(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batches: list[Any], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        samples = sum(len(x) for x, _ in batches)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = sum(F.mse_loss(self.net(x), y, reduction="sum") for x, y in batches) / samples
            self.manual_backward(loss)  # gradients averaged over the ranks
            return self.trainer.strategy.reduce(loss.detach(), "mean")  # the same loss on every rank

        loss = opt.step(closure=closure)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5, history_size=10,
                                 line_search_fn="strong_wolfe")


def dataset(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, torch.sin(x).sum(dim=1, keepdim=True))


def main(root: str, callbacks: list[distloop.Callback] = (), max_epochs: int = 6) -> dict[str, Any]:
    """Fit (resuming from ``root``'s last checkpoint, if any); returns the final weights and loss."""
    trainer = distloop.Trainer(
        max_epochs=max_epochs, default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[distloop.ModelCheckpoint(every_n_epochs=1, save_last=True), *callbacks])
    trainer.fit_loop.replace(epoch_loop=FullBatchEpochLoop)
    module = LeastSquares()
    trainer.fit(module, DataLoader(dataset(), batch_size=16, shuffle=True), ckpt_path="last")
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()},
            "loss": trainer.callback_metrics["train_loss"].clone(), "global_step": trainer.global_step}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/full_batch_lbfgs")
    print(f"global_step={result['global_step']} train_loss={result['loss']:.6f}")
