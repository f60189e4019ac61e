"""Turn ``accelerator`` / ``devices`` / ``strategy`` arguments into a Strategy, or say what to change."""

from __future__ import annotations

from typing import Any

from distloop.errors import MisconfigurationError
from distloop.strategies.ddp import DDPStrategy, distributed_env
from distloop.strategies.fsdp import FSDPStrategy
from distloop.strategies.devices import check_accelerator, check_one_process, check_strategy, cuda_device, uses_cuda
from distloop.strategies.single_device import SingleDeviceStrategy
from distloop.strategies.strategy import Strategy


def resolve_strategy(strategy: str | Strategy, accelerator: str, devices: int | str, precision: Any,
                     **ddp_options: Any) -> Strategy:
    """The launcher decides how many processes run; ``devices`` only has to agree with it."""
    if isinstance(strategy, Strategy):
        return strategy
    check_accelerator(accelerator)
    check_strategy(strategy)
    use_cuda = uses_cuda(accelerator)
    if devices != "auto" and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 1):
        raise MisconfigurationError(f"devices={devices!r} must be 'auto' or an int >= 1.")
    rank, local_rank, world_size = distributed_env()
    if devices != "auto" and world_size == 1 and devices > 1:
        raise MisconfigurationError(
            f"devices={devices} but only this one process runs: start {devices} processes with "
            f"`distloop launcher.nproc_per_node={devices} strategy=ddp` or `torchrun --nproc-per-node {devices}`.")
    if strategy == "fsdp":
        return FSDPStrategy(accelerator=accelerator, precision=precision)
    if strategy == "ddp_find_unused_parameters_true":  # Lightning's name: some parameters may get no gradient
        return DDPStrategy(accelerator=accelerator, precision=precision, **{**ddp_options,
                                                                            "find_unused_parameters": True})
    if strategy == "ddp" or (strategy == "auto" and world_size > 1):
        return DDPStrategy(accelerator=accelerator, precision=precision, **ddp_options)
    check_one_process(strategy, world_size)
    return SingleDeviceStrategy(cuda_device(local_rank) if use_cuda else "cpu", precision)
