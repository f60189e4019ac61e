"""Logger: where step and epoch metrics go. The Trainer calls loggers on global rank zero only."""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping

from distloop.strategies.ddp import distributed_env


class Logger(ABC):
    """Lightning's logger interface; ``log_dir``, ``log_metrics`` and ``log_hyperparams`` are required."""

    @property
    @abstractmethod
    def log_dir(self) -> str:
        """The directory this logger writes into."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_hyperparams(self, params: dict[str, Any]) -> None: ...

    @property
    def name(self) -> str | None:
        """The experiment's name (a folder level under ``save_dir``)."""
        return None

    @property
    def version(self) -> int | str | None:
        """The run's version within the experiment."""
        return None

    @property
    def save_dir(self) -> str | None:
        """Where this logger's experiments live, or ``None`` when it writes nothing locally."""
        return None

    @property
    def root_dir(self) -> str | None:
        """The directory holding every version of this experiment."""
        return None

    @property
    def group_separator(self) -> str:
        return "/"

    @property
    def state_key(self) -> str:
        """Key of this logger's state in a checkpoint."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this logger's run (a tracker's run id); empty:
        nothing is saved. Read on global rank zero, whose logger is the one that writes."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored before the run logs anything, so the logger continues the saved run."""

    def log_graph(self, model: Any, input_array: Any = None) -> None:
        """Record the model's graph, where the logger can."""

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """``checkpoint_callback`` (a ``ModelCheckpoint``) has just saved a file."""

    def save(self) -> None:
        """Flush what is buffered."""

    def finalize(self, status: str) -> None:
        """The run ended with ``status`` ("success", "failed" or "interrupted")."""
        self.save()


class VersionedLogger(Logger):
    """Writes to ``save_dir/name/version``: ``name`` ``None`` or ``""`` drops that level; a
    ``version`` string is the folder's name, an int ``N`` is ``version_N``, and ``None`` takes
    the next version after the highest one found, decided once (see ``agree_on_versions``)."""

    def __init__(self, save_dir: str | os.PathLike, name: str | None, version: int | str | None, prefix: str) -> None:
        self._save_dir = os.fspath(save_dir)
        self._name = name or ""
        self._version = version
        self._prefix = prefix

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = next_version(self.root_dir)
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return os.path.join(self.save_dir, self.name)

    @property
    def log_dir(self) -> str:
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self.root_dir, version)

    def _prefixed(self, metrics: Mapping[str, Any]) -> Mapping[str, Any]:
        if not self._prefix:
            return metrics
        return {f"{self._prefix}-{k}": v for k, v in metrics.items()}


def next_version(root: str) -> int:
    """One more than the highest ``version_N`` folder in ``root`` (0 when there is none)."""
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    found = [int(n.split("_")[1]) for n in names
             if n.startswith("version_") and n.split("_")[1].isdigit() and os.path.isdir(os.path.join(root, n))]
    return max(found) + 1 if found else 0


def agree_on_versions(loggers: list[Logger], strategy: Any) -> None:
    """Every rank takes rank zero's version of each logger, so ``log_dir`` is the same on all
    of them (ranks that each looked for the next free version could find different ones).
    A collective: call it on every rank, once the strategy's processes are set up."""
    versioned = [lg for lg in loggers if isinstance(lg, VersionedLogger)]
    if not versioned or strategy.world_size == 1:
        return
    mine = [lg.version for lg in versioned] if strategy.is_global_zero else None
    for lg, version in zip(versioned, strategy.broadcast(mine)):
        lg._version = version


class _DummyExperiment:
    """``experiment`` on ranks other than zero: every call does nothing, as only rank zero writes."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def rank_zero_experiment(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """For an ``experiment`` property: the real one on global rank zero, a do-nothing one elsewhere,
    so a call such as ``logger.experiment.add_image(...)`` on every rank writes once."""

    @functools.wraps(fn)
    def experiment(self: Any) -> Any:
        return fn(self) if distributed_env()[0] == 0 else _DummyExperiment()

    return experiment
