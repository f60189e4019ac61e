"""Turn ``accelerator`` / ``devices`` / ``strategy`` arguments into a Strategy, or say what to change."""

from __future__ import annotations

import os
from typing import Any

import torch

from distloop.errors import MisconfigurationError
from distloop.strategies.single_device import SingleDeviceStrategy
from distloop.strategies.strategy import Strategy

ACCELERATORS = ("auto", "cpu", "cuda", "gpu")
STRATEGIES = ("auto", "single_device")


def resolve_strategy(strategy: str | Strategy, accelerator: str, devices: int | str, precision: Any) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if accelerator not in ACCELERATORS:
        raise MisconfigurationError(f"accelerator={accelerator!r} is not known: use one of {ACCELERATORS}.")
    if strategy not in STRATEGIES:
        raise MisconfigurationError(f"strategy={strategy!r} is not known: use one of {STRATEGIES}.")
    use_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise MisconfigurationError(f"accelerator={accelerator!r} needs CUDA, which this machine lacks: use accelerator='cpu'.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = 1 if devices == "auto" else devices
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise MisconfigurationError(f"devices={devices!r} must be 'auto' or an int >= 1.")
    if world_size > 1 or wanted > 1:
        raise MisconfigurationError(
            f"{max(world_size, wanted)} processes need the DDP strategy, which this version does not have yet; "
            "run one process with devices=1.")
    if use_cuda:
        available = torch.cuda.device_count()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= available:
            raise MisconfigurationError(f"LOCAL_RANK={local_rank} but only {available} CUDA devices exist.")
        return SingleDeviceStrategy(f"cuda:{local_rank}", precision)
    return SingleDeviceStrategy("cpu", precision)
