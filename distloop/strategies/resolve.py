"""Turn ``accelerator`` / ``devices`` / ``strategy`` arguments into a Strategy, or say what to change."""

from __future__ import annotations

from typing import Any

import torch

from distloop.errors import MisconfigurationError
from distloop.strategies.ddp import DDPStrategy, distributed_env
from distloop.strategies.single_device import SingleDeviceStrategy
from distloop.strategies.strategy import Strategy

ACCELERATORS = ("auto", "cpu", "cuda", "gpu")
STRATEGIES = ("auto", "single_device", "ddp")


def resolve_strategy(strategy: str | Strategy, accelerator: str, devices: int | str, precision: Any,
                     **ddp_options: Any) -> Strategy:
    """The launcher decides how many processes run; ``devices`` only has to agree with it."""
    if isinstance(strategy, Strategy):
        return strategy
    if accelerator not in ACCELERATORS:
        raise MisconfigurationError(f"accelerator={accelerator!r} is not known: use one of {ACCELERATORS}.")
    if strategy not in STRATEGIES:
        raise MisconfigurationError(f"strategy={strategy!r} is not known: use one of {STRATEGIES}.")
    use_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise MisconfigurationError(f"accelerator={accelerator!r} needs CUDA, which this machine lacks: use accelerator='cpu'.")
    if devices != "auto" and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise MisconfigurationError(f"devices={devices!r} must be 'auto' or an int >= 1.")
    rank, local_rank, world_size = distributed_env()
    if devices != "auto" and world_size == 1 and devices > 1:
        raise MisconfigurationError(
            f"devices={devices} but only this one process runs: start {devices} processes with "
            f"`distloop launcher.nproc_per_node={devices} strategy=ddp` or `torchrun --nproc-per-node {devices}`.")
    if strategy == "ddp" or (strategy == "auto" and world_size > 1):
        return DDPStrategy(accelerator=accelerator, precision=precision, **ddp_options)
    if world_size > 1:
        raise MisconfigurationError(f"strategy={strategy!r} runs one process, but WORLD_SIZE={world_size}: "
                                    "use strategy='ddp' (or 'auto').")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise MisconfigurationError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices exist.")
        return SingleDeviceStrategy(f"cuda:{local_rank}", precision)
    return SingleDeviceStrategy("cpu", precision)
