"""The columns of RichProgressBar's display, in Lightning's order (imported only once rich is)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
from rich.text import Text


class TimesColumn(ProgressColumn):
    """``elapsed • remaining``."""

    max_refresh = 0.5

    def __init__(self, style: Any) -> None:
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        return Text(f"{_clock(elapsed)} • {_clock(task.time_remaining)}", style=self.style)


class SpeedColumn(ProgressColumn):
    """Batches per second: rich's recent rate, or the task's mean rate before rich has two samples."""

    def __init__(self, style: Any) -> None:
        self.style = style
        super().__init__()

    def render(self, task: Task) -> Text:
        speed = task.speed
        if speed is None:
            seconds = task.finished_time if task.finished else task.elapsed
            speed = task.completed / seconds if seconds else 0.0
        return Text(f"{speed:.2f}it/s", style=self.style)


def columns(theme: Any) -> list[ProgressColumn]:
    """Description, bar, ``N/M`` (``M`` is ``--`` for an endless loader), times, speed, metrics.

    A task carries its ``of`` (the total as text) and ``metrics`` (empty but for the training task)."""
    return [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(complete_style=theme.progress_bar, finished_style=theme.progress_bar_finished,
                  pulse_style=theme.progress_bar_pulse),
        TextColumn("{task.completed:.0f}/{task.fields[of]}", style=theme.batch_progress),
        TimesColumn(theme.time),
        SpeedColumn(theme.processing_speed),
        TextColumn("{task.fields[metrics]}", style=theme.metrics, markup=False),
    ]


def _clock(seconds: float | None) -> str:
    return "-:--:--" if seconds is None else str(timedelta(seconds=int(seconds)))
