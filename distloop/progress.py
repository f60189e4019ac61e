"""Checkpointable progress counters.

A loop counts what it did in these trackers so a checkpoint can say exactly where a run
stopped. Their state is plain Python (ints, bools, dicts): it survives
``torch.load(weights_only=True)``.

Each tracker counts the stages of a unit of work (a batch, an epoch, an optimizer step):
``ready`` -> ``started`` -> ``processed`` -> ``completed``. A ``Progress`` keeps a
``total`` tracker (since the run began) and a ``current`` one (since the enclosing loop
last reset). After a restart, ``reset_on_restart`` rolls ``current`` back to its last
completed value, so an interrupted unit is done again rather than skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

_T = TypeVar("_T", bound="BaseProgress")


@dataclass
class BaseProgress:
    """Mixin giving every tracker ``state_dict`` / ``load_state_dict`` / ``from_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Unknown keys are ignored and missing ones keep their value, so older
        # checkpoints still load.
        for name in self.__dataclass_fields__:
            if name not in state_dict:
                continue
            current = getattr(self, name)
            if isinstance(current, BaseProgress):
                current.load_state_dict(state_dict[name])
            else:
                setattr(self, name, state_dict[name])

    @classmethod
    def from_state_dict(cls: type[_T], state_dict: dict[str, Any]) -> _T:
        obj = cls()
        obj.load_state_dict(state_dict)
        return obj

    def reset(self) -> None:
        raise NotImplementedError


@dataclass
class ReadyCompletedTracker(BaseProgress):
    """Counts units that were made ready and units that completed."""

    ready: int = 0
    completed: int = 0

    def reset(self) -> None:
        self.ready = 0
        self.completed = 0

    def reset_on_restart(self) -> None:
        self.ready = self.completed


@dataclass
class StartedTracker(ReadyCompletedTracker):
    """Adds ``started``."""

    started: int = 0

    def reset(self) -> None:
        super().reset()
        self.started = 0

    def reset_on_restart(self) -> None:
        super().reset_on_restart()
        self.started = self.completed


@dataclass
class ProcessedTracker(StartedTracker):
    """Adds ``processed``: the work is done but its end hooks have not run yet."""

    processed: int = 0

    def reset(self) -> None:
        super().reset()
        self.processed = 0

    def reset_on_restart(self) -> None:
        super().reset_on_restart()
        self.processed = self.completed


@dataclass
class Progress(BaseProgress):
    """A ``total`` and a ``current`` tracker of the same kind, incremented together."""

    total: ReadyCompletedTracker = field(default_factory=ProcessedTracker)
    current: ReadyCompletedTracker = field(default_factory=ProcessedTracker)

    def __post_init__(self) -> None:
        if type(self.total) is not type(self.current):
            raise TypeError("`total` and `current` must be trackers of the same class")

    @classmethod
    def from_defaults(cls, tracker_cls: type[ReadyCompletedTracker], **kwargs: int) -> Progress:
        return cls(total=tracker_cls(**kwargs), current=tracker_cls(**kwargs))

    def increment_ready(self) -> None:
        self.total.ready += 1
        self.current.ready += 1

    def increment_started(self) -> None:
        try:
            self.total.started += 1  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(f"`{type(self.total).__name__}` has no `started` counter") from None
        self.current.started += 1  # type: ignore[attr-defined]

    def increment_processed(self) -> None:
        try:
            self.total.processed += 1  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(f"`{type(self.total).__name__}` has no `processed` counter") from None
        self.current.processed += 1  # type: ignore[attr-defined]

    def increment_completed(self) -> None:
        self.total.completed += 1
        self.current.completed += 1

    def reset(self) -> None:
        self.total.reset()
        self.current.reset()

    def reset_on_run(self) -> None:
        self.current.reset()

    def reset_on_restart(self) -> None:
        self.current.reset_on_restart()


@dataclass
class BatchProgress(Progress):
    """Batch counts plus whether the last fetched batch was the epoch's last one."""

    is_last_batch: bool = False

    def reset(self) -> None:
        super().reset()
        self.is_last_batch = False

    def reset_on_run(self) -> None:
        super().reset_on_run()
        self.is_last_batch = False


@dataclass
class OptimizerProgress(BaseProgress):
    """Optimizer ``step`` and ``zero_grad`` calls."""

    step: Progress = field(default_factory=lambda: Progress.from_defaults(ReadyCompletedTracker))
    zero_grad: Progress = field(default_factory=lambda: Progress.from_defaults(StartedTracker))

    def reset(self) -> None:
        self.step.reset()
        self.zero_grad.reset()

    def reset_on_run(self) -> None:
        self.step.reset_on_run()
        self.zero_grad.reset_on_run()

    def reset_on_restart(self) -> None:
        self.step.reset_on_restart()
        self.zero_grad.reset_on_restart()


@dataclass
class OptimizationProgress(BaseProgress):
    """What automatic optimization did; ``optimizer_steps`` is the trainer's global step."""

    optimizer: OptimizerProgress = field(default_factory=OptimizerProgress)

    @property
    def optimizer_steps(self) -> int:
        return self.optimizer.step.total.completed

    def reset(self) -> None:
        self.optimizer.reset()

    def reset_on_run(self) -> None:
        self.optimizer.reset_on_run()

    def reset_on_restart(self) -> None:
        self.optimizer.reset_on_restart()
