"""Logger: where step and epoch metrics go. The Trainer calls loggers on global rank zero only."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any


class Logger(ABC):
    @property
    @abstractmethod
    def log_dir(self) -> str:
        """The directory this logger writes into."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None: ...

    def save(self) -> None:
        """Flush what is buffered."""

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("success", "failed" or "interrupted")."""
        self.save()


def next_version_dir(root: str) -> str:
    """``root/version_N`` for the first N not taken yet."""
    version = 0
    while os.path.exists(os.path.join(root, f"version_{version}")):
        version += 1
    return os.path.join(root, f"version_{version}")
