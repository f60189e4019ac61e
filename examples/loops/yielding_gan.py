"""Loop cookbook: a training step that yields, one loss per optimizer.

A GAN's two steps share work: the discriminator's step reuses the images the generator's
step made. With a generator function as ``training_step``, the shared values are plain
locals: the step yields the generator's loss, the loop updates the generator, and the step
continues where it stopped, with ``fake`` still in hand, to yield the discriminator's loss.

``YieldingOptimization`` drives it: per optimizer, in order, it toggles that optimizer, takes
the next loss, runs ``manual_backward`` and steps. It is the epoch loop's
``manual_optimization``, so the module sets ``automatic_optimization = False`` and each
optimizer step counts as a global step, as in Lightning's manual optimization; ``ManualGAN``
below is that manual version, and both train the same weights.

    python examples/loops/yielding_gan.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/yielding_gan.py [ROOT]
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop
from distloop.loops import ManualOptimization


class YieldingOptimization(ManualOptimization):
    """Runs a ``training_step`` that yields a loss per optimizer, stepping each optimizer in turn."""

    def training_step(self, trainer: Any, batch: Any, batch_idx: int) -> Any:
        module = trainer.module
        steps: Iterator[torch.Tensor] = super().training_step(trainer, batch, batch_idx)  # nothing has run yet
        losses = {}
        for i, opt in enumerate(module.optimizers()):
            with module.toggled_optimizer(opt):
                loss = next(steps)
                module.manual_backward(loss)
                opt.step()
                opt.zero_grad()
            losses[f"loss_{i}"] = loss.detach()
        if next(steps, None) is not None:
            raise RuntimeError("training_step yielded more losses than there are optimizers")
        return losses


class GAN(distloop.LoopModule):
    """Generator: noise (4) -> point (2); discriminator: point -> real or fake."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Iterator[torch.Tensor]:
        real, noise = batch
        fake = self.generator(noise)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.ones(len(fake), 1))
        self.log("g_loss", g_loss, sync_dist=True)
        yield g_loss
        fake = fake.detach()  # made once, used by both steps
        d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), torch.ones(len(real), 1))
                  + F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.zeros(len(fake), 1))) / 2
        self.log("d_loss", d_loss, sync_dist=True)
        yield d_loss

    def configure_optimizers(self) -> Any:
        return (torch.optim.Adam(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999)))


class ManualGAN(GAN):
    """The same GAN in Lightning's manual optimization: the generator's output kept by hand."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, noise = batch
        g_opt, d_opt = self.optimizers()
        with self.toggled_optimizer(g_opt):
            fake = self.generator(noise)
            g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.ones(len(fake), 1))
            self.log("g_loss", g_loss, sync_dist=True)
            self.manual_backward(g_loss)
            g_opt.step()
            g_opt.zero_grad()
        fake = fake.detach()
        with self.toggled_optimizer(d_opt):
            d_loss = (F.binary_cross_entropy_with_logits(self.discriminator(real), torch.ones(len(real), 1))
                      + F.binary_cross_entropy_with_logits(self.discriminator(fake), torch.zeros(len(fake), 1))) / 2
            self.log("d_loss", d_loss, sync_dist=True)
            self.manual_backward(d_loss)
            d_opt.step()
            d_opt.zero_grad()


def dataset(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    angle = torch.rand(n, generator=g) * 6.2832
    real = torch.stack([angle.cos(), angle.sin()], dim=1)  # points on a circle
    return TensorDataset(real, torch.randn(n, 4, generator=g))


def fit(root: str, module: GAN, callbacks: list[distloop.Callback], yielding: bool) -> distloop.Trainer:
    trainer = distloop.Trainer(
        max_epochs=3, default_root_dir=root, seed=0, deterministic=True, log_every_n_steps=2,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[distloop.ModelCheckpoint(every_n_train_steps=4, save_last=True), *callbacks])
    if yielding:
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop.manual_optimization = YieldingOptimization(epoch_loop.optim_progress)
    batch_size = 16 // trainer.world_size  # the same global batches on one process and on two
    trainer.fit(module, DataLoader(dataset(), batch_size=batch_size, shuffle=True), ckpt_path="last")
    return trainer


def main(root: str, callbacks: list[distloop.Callback] = ()) -> dict[str, Any]:
    """The yielding GAN (resuming from ``root``'s last checkpoint, if any), then the manual one."""
    yielding, manual = GAN(), ManualGAN()
    trainer = fit(f"{root}/yielding", yielding, list(callbacks), yielding=True)
    fit(f"{root}/manual", manual, [], yielding=False)
    return {"weights": {k: v.clone() for k, v in yielding.state_dict().items()},
            "manual_weights": {k: v.clone() for k, v in manual.state_dict().items()},
            "global_step": trainer.global_step, "d_loss": trainer.callback_metrics["d_loss"].clone()}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/yielding_gan")
    same = all(torch.equal(result["weights"][k], result["manual_weights"][k]) for k in result["weights"])
    print(f"global_step={result['global_step']} d_loss={result['d_loss']:.4f} same as manual: {same}")
