"""Optimizers and LR schedulers from ``configure_optimizers``, and when each scheduler steps.

``configure_optimizers`` may return what Lightning accepts: an optimizer; a list of them;
``([optimizers], [schedulers])``; or ``{"optimizer": ..., "lr_scheduler": ...}`` where a
scheduler may itself be a dict with ``interval`` ("epoch" or "step"), ``frequency`` and
``monitor`` (for ``ReduceLROnPlateau``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from distloop.errors import MisconfigurationError


@dataclass
class LRSchedulerConfig:
    """One scheduler and when it steps (Lightning's names and defaults)."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None


@dataclass
class OptimizerSetup:
    """What ``configure_optimizers`` returned, parsed."""

    optimizers: list[Optimizer]
    lr_scheduler_configs: list[LRSchedulerConfig]


def parse_optimizers(config: Any) -> OptimizerSetup:
    """``configure_optimizers``' return value, checked; automatic optimization takes one optimizer."""
    schedulers: list[Any] = []
    if isinstance(config, dict):
        if "optimizer" not in config:
            raise MisconfigurationError("configure_optimizers() returned a dict without an 'optimizer' key.")
        optimizers = [config["optimizer"]]
        if config.get("lr_scheduler") is not None:
            schedulers = [config["lr_scheduler"]]
    elif isinstance(config, Optimizer):
        optimizers = [config]
    elif isinstance(config, (list, tuple)) and len(config) == 2 and isinstance(config[0], (list, tuple)):
        optimizers, schedulers = list(config[0]), list(config[1])
    elif isinstance(config, (list, tuple)):
        optimizers = list(config)
    else:
        raise MisconfigurationError(
            f"configure_optimizers() returned {type(config).__name__}: return an optimizer, "
            "([optimizer], [schedulers]) or {'optimizer': ..., 'lr_scheduler': ...}.")
    if len(optimizers) != 1 or not isinstance(optimizers[0], Optimizer):
        raise MisconfigurationError(
            f"Automatic optimization takes exactly one torch optimizer; configure_optimizers() gave "
            f"{len(optimizers)}. For several, replace the training-epoch loop (see the README).")
    return OptimizerSetup(optimizers, [_scheduler_config(s) for s in schedulers])


def _scheduler_config(entry: Any) -> LRSchedulerConfig:
    if isinstance(entry, dict):
        if "scheduler" not in entry:
            raise MisconfigurationError("An lr_scheduler dict needs a 'scheduler' key.")
        config = LRSchedulerConfig(entry["scheduler"], entry.get("interval", "epoch"), entry.get("frequency", 1),
                                   entry.get("monitor"))
    else:
        config = LRSchedulerConfig(entry)
    if config.interval not in ("step", "epoch"):
        raise MisconfigurationError(f"lr_scheduler interval={config.interval!r}: use 'step' or 'epoch'.")
    if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) and config.monitor is None:
        raise MisconfigurationError("ReduceLROnPlateau needs {'scheduler': ..., 'monitor': 'metric_name'}.")
    return config


def step_schedulers(configs: list[LRSchedulerConfig], interval: str, count: int,
                    metrics: Mapping[str, Tensor]) -> None:
    """Step the schedulers of ``interval`` whose ``frequency`` divides ``count``.

    ``count`` is the global step for "step" schedulers and the number of finished epochs
    for "epoch" ones; ``ReduceLROnPlateau`` reads its monitored value from ``metrics``.
    """
    for config in configs:
        if config.interval != interval or count % config.frequency:
            continue
        if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = config.monitor or ""
            if monitor not in metrics:
                raise MisconfigurationError(
                    f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; logged: "
                    f"{sorted(metrics)}. Set 'monitor' in the lr_scheduler dict.")
            config.scheduler.step(float(metrics[monitor]))
        else:
            config.scheduler.step()
