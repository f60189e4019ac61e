"""Strategies: where the module runs and how ranks talk."""

from distloop.strategies.ddp import DDPStrategy
from distloop.strategies.fsdp import FSDPStrategy
from distloop.strategies.resolve import resolve_strategy
from distloop.strategies.single_device import SingleDeviceStrategy
from distloop.strategies.strategy import Strategy

__all__ = ["DDPStrategy", "FSDPStrategy", "SingleDeviceStrategy", "Strategy", "resolve_strategy"]
