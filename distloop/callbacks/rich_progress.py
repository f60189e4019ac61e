"""RichProgressBar: Lightning's rich display of training and (while it runs) validation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from distloop.callbacks.progress import ProgressBar, finite_or_none, format_metrics
from distloop.extras import require


@dataclass
class RichProgressBarTheme:
    """Styles of the display's parts (https://rich.readthedocs.io/en/stable/style.html), as Lightning's."""

    description: Any = ""
    progress_bar: Any = "#6206E0"
    progress_bar_finished: Any = "#6206E0"
    progress_bar_pulse: Any = "#6206E0"
    batch_progress: Any = ""
    time: Any = "dim"
    processing_speed: Any = "dim underline"
    metrics: Any = "italic"
    metrics_text_delimiter: str = " "
    metrics_format: str = ".3f"


class RichProgressBar(ProgressBar):
    """Training: ``Epoch N/last``, bar, batch N/M, elapsed • remaining, it/s and the ``prog_bar``
    metrics; validation in a bar of its own, removed when it ends during ``fit``. Off a terminal:
    one line per epoch.

    ``refresh_rate``: redraws per second at most (0: no bar), as Lightning's since 2.6.4;
    ``leave``: keep each epoch's finished bar on screen; ``console_kwargs``: for rich's ``Console``
    (``file`` is the stream, stderr by default). Needs the ``rich`` extra.
    """

    _live = (*ProgressBar._live, "_console", "_progress", "_train_task", "_val_task")

    def __init__(self, refresh_rate: int = 100, leave: bool = False,
                 theme: RichProgressBarTheme = RichProgressBarTheme(),  # noqa: B008 - Lightning's default
                 console_kwargs: dict[str, Any] | None = None) -> None:
        require("rich", "rich", "RichProgressBar")
        console_kwargs = dict(console_kwargs or {})
        super().__init__(refresh_rate, console_kwargs.pop("file", None))
        self._leave = leave
        self.theme = theme
        self._console_kwargs = console_kwargs
        self._console: Any = None
        self._progress: Any = None
        self._train_task: Any = None
        self._val_task: Any = None
        self._next_draw = 0.0
        self._shown_version = -1

    def _get_console(self) -> Any:
        """rich's Console on the stream, made when first needed (it is not copied or pickled)."""
        if self._console is None:
            from rich.console import Console

            where = {"stderr": True} if self._stream is None else {"file": self._stream}
            self._console = Console(**{**where, **self._console_kwargs})
        return self._console

    @property
    def interactive(self) -> bool:
        console = self._get_console()
        return console.is_terminal or console.is_jupyter

    def _start(self) -> Any:
        if self._progress is None:
            from rich.progress import Progress

            from distloop.callbacks._rich_columns import columns

            self._progress = Progress(*columns(self.theme), console=self._get_console(), auto_refresh=False)
            self._progress.start()
        return self._progress

    def _stop(self) -> None:
        """Ends the display and gives the terminal (and redirected stdout/stderr) back."""
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._train_task = self._val_task = None

    def _add_task(self, description: str, total: int | float) -> Any:
        total = finite_or_none(total)
        if self.theme.description:
            description = f"[{self.theme.description}]{description}"
        return self._progress.add_task(description, total=total, of="--" if total is None else total, metrics="")

    def _draw(self, task: Any, completed: int, force: bool = False) -> None:
        """Moves ``task`` to ``completed``; redraws at most ``refresh_rate`` times a second unless forced."""
        self._progress.update(task, completed=completed)
        now = time.monotonic()
        if force or now >= self._next_draw:
            self._next_draw = now + 1 / self._refresh_rate
            self._progress.refresh()

    # ------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        super().on_train_epoch_start(trainer, module)
        if not self._draws:
            return
        if self._leave and self._train_task is not None:
            self._stop()  # the finished epoch's display stays on screen
        progress = self._start()
        description = self._train_description(trainer)
        if self._train_task is None:
            self._train_task = self._add_task(description, self.total_train_batches)
        else:
            total = finite_or_none(self.total_train_batches)
            progress.reset(self._train_task, total=total, description=description, visible=True,
                           of="--" if total is None else total, metrics="")
        self._shown_version = -1
        self._draw(self._train_task, 0, force=True)

    def _train_description(self, trainer: Any) -> str:
        text = f"Epoch {trainer.current_epoch}" + (f"/{trainer.max_epochs - 1}" if trainer.max_epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._train_task is None or time.monotonic() < self._next_draw:  # the hot path: no work between draws
            return
        self._show_metrics(trainer, module)
        self._draw(self._train_task, batch_idx + 1)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        super().on_train_epoch_end(trainer, module)
        if self._train_task is not None:
            self._show_metrics(trainer, module)
            self._draw(self._train_task, trainer.fit_loop.epoch_loop.batch_progress.current.completed, force=True)

    def _show_metrics(self, trainer: Any, module: Any) -> None:
        if trainer.metrics_version == self._shown_version:
            return
        self._shown_version = trainer.metrics_version
        values = format_metrics(self.get_metrics(trainer, module), self.theme.metrics_format)
        text = self.theme.metrics_text_delimiter.join(f"{k}: {v}" for k, v in values.items())
        self._progress.update(self._train_task, metrics=text)

    # ------------------------------------------------------------ validation
    def on_validation_start(self, trainer: Any, module: Any) -> None:
        self.reset_dataloader_idx_tracker()
        if self.is_enabled and self.interactive:
            self._start()

    def on_validation_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._progress is None:
            return
        if self.has_dataloader_changed(dataloader_idx):
            self._remove_val_task()
            stage = self.sanity_check_description if trainer.sanity_checking else self.validation_description
            self._val_task = self._add_task(stage, self.total_val_batches_current_dataloader)
        self._draw(self._val_task, batch_idx + 1)

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        self.reset_dataloader_idx_tracker()
        if self._progress is None or trainer.state.fn != "fit":
            return
        self._remove_val_task()
        if self._train_task is not None:
            self._show_metrics(trainer, module)
        self._progress.refresh()

    def _remove_val_task(self) -> None:
        if self._val_task is not None:
            self._progress.remove_task(self._val_task)
            self._val_task = None

    # ------------------------------------------------------------ the end
    def teardown(self, trainer: Any, module: Any, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
        self._stop()
