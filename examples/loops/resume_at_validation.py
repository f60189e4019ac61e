"""Loop cookbook: no second validation right after a resume.

In Lightning a step checkpoint is written before the validation its step triggers, so a run
resumed from it validates again at once; NVIDIA NeMo subclasses a private Lightning loop to
skip that repeat. distloop writes checkpoints only at resumable points, after the validation
a step triggered, so a resumed run validates at exactly the steps an uninterrupted run does,
with no loop to write. ``ValidationSteps`` records those steps (in the checkpoint, so a resumed
run's list is whole) and the test kills a rank right after a checkpoint on a validation
boundary. A loop that wants its own validation schedule overrides
``TrainingEpochLoop.should_validate``, as the alternating-tasks recipe does.

    python examples/loops/resume_at_validation.py [ROOT]
    torchrun --nproc-per-node 2 examples/loops/resume_at_validation.py [ROOT]
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop


class ValidationSteps(distloop.Callback):
    """The global steps at which validation ran."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict["steps"])


class Regressor(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(root: str, callbacks: list[distloop.Callback] = ()) -> dict[str, Any]:
    """Fit, validating every 4 steps (resuming from ``root``'s last checkpoint, if any)."""
    validations = ValidationSteps()
    trainer = distloop.Trainer(
        max_epochs=2, val_check_interval=4, default_root_dir=root, seed=0, deterministic=True,
        enable_progress_bar=False, enable_model_summary=False, logger=False,
        callbacks=[validations, *callbacks, distloop.ModelCheckpoint(every_n_train_steps=4, save_last=True)])
    g = torch.Generator().manual_seed(6)
    x = torch.randn(128, 4, generator=g)
    data = TensorDataset(x, x.prod(dim=1, keepdim=True))
    batch_size = 16 // trainer.world_size  # the same global batches on one process and on two
    module = Regressor()
    trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=True),
                DataLoader(data, batch_size=batch_size), ckpt_path="last")
    return {"validated_at": validations.steps, "val_loss": trainer.callback_metrics["val_loss"].clone(),
            "weights": {k: v.clone() for k, v in module.state_dict().items()}}


if __name__ == "__main__":
    result = main(sys.argv[1] if len(sys.argv) > 1 else "runs/resume_at_validation")
    print(f"validated at steps {result['validated_at']}")
