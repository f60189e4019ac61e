"""One process on one device (CPU or one CUDA device): every collective is an identity."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor

from distloop.strategies.strategy import Strategy

T = TypeVar("T")


class SingleDeviceStrategy(Strategy):
    def __init__(self, device: torch.device | str = "cpu", precision: Any = "32") -> None:
        super().__init__(device, precision)

    @property
    def world_size(self) -> int:
        return 1

    @property
    def global_rank(self) -> int:
        return 0

    @property
    def local_rank(self) -> int:
        return 0

    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor:
        return tensor

    def broadcast(self, obj: T, src: int = 0) -> T:
        return obj

    def barrier(self, name: str | None = None) -> None:
        pass

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor.unsqueeze(0)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision

    def gather_object(self, obj: T) -> list[T]:
        return [obj]

    def check_all_ranks_here(self, what: str) -> None:
        pass
