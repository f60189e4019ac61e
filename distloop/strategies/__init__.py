"""Strategies: where the module runs and how ranks talk."""

from distloop.strategies.ddp import DDPStrategy
from distloop.strategies.resolve import resolve_strategy
from distloop.strategies.single_device import SingleDeviceStrategy
from distloop.strategies.strategy import Strategy

__all__ = ["DDPStrategy", "SingleDeviceStrategy", "Strategy", "resolve_strategy"]
