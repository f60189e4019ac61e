"""What the benchmarks share: the module they train, and what every report states (machine, code)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distloop

LR = 0.01


def metric_values(loss: Tensor, scales: Tensor) -> tuple[Tensor, ...]:
    """The values logged per step: the (detached) loss times each of ``scales``, as 0-d tensors.

    Computed together (one multiply, one unbind), as a user computes related statistics,
    so that the benchmarks time logging rather than eight separate tiny kernels.
    """
    return (loss.detach() * scales).unbind()


def metric_scales(n: int) -> Tensor:
    """1, 2, ..., n: a constant the module builds once."""
    return torch.arange(1, n + 1, dtype=torch.float32)


class Bench(distloop.LoopModule):
    """``model`` trained with MSE and SGD, logging ``n_metrics`` values per step (step and epoch)."""

    def __init__(self, model: nn.Module, n_metrics: int, sync_dist: bool = False) -> None:
        super().__init__()
        self.model = model
        self.n_metrics = n_metrics
        self.sync_dist = sync_dist
        self.names = [f"m{i}" for i in range(n_metrics)]  # constant names, as in a user's code
        self.scales = metric_scales(n_metrics)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        if self.names:
            for name, value in zip(self.names, metric_values(loss, self.scales)):
                self.log(name, value, on_step=True, on_epoch=True, sync_dist=self.sync_dist)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def loop_only() -> dict[str, bool]:
    """Trainer arguments that leave out what the hand-written loops do not do (a checkpoint per
    epoch, the model summary), where this version of distloop has them."""
    import inspect

    known = inspect.signature(distloop.Trainer).parameters
    return {name: False for name in ("enable_checkpointing", "enable_model_summary") if name in known}


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def code_version() -> str:
    """distloop's version and git commit, flagged when distloop/ has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "distloop")
    except (OSError, subprocess.CalledProcessError):
        return f"distloop {distloop.__version__}"
    return f"distloop {distloop.__version__} ({head}{', with uncommitted changes to distloop/' if dirty else ''})"


def machine_cpu_seconds() -> float:
    """CPU seconds used by every process on this machine since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds used by this process and its finished children (the ranks, once joined)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))
