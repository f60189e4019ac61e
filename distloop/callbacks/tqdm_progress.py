"""TQDMProgressBar: Lightning's tqdm bars, for training and (while it runs) validation."""

from __future__ import annotations

from typing import Any

from distloop.callbacks.progress import ProgressBar, finite_or_none, format_metrics


class TQDMProgressBar(ProgressBar):
    """Training: epoch, batch N/M, elapsed<remaining, it/s and the ``prog_bar`` metrics; validation in a
    bar of its own, cleared when it ends during ``fit``. Off a terminal: one line per epoch.

    ``refresh_rate``: update every this many batches (0: no bar); ``process_position``: draw this many
    bars lower (for bars of your own above); ``leave``: keep each epoch's finished bar on screen.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    _live = (*ProgressBar._live, "_train_bar", "_val_bar")

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 stream: Any = None) -> None:
        super().__init__(refresh_rate, stream)
        self._process_position = process_position
        self._leave = leave
        self._train_bar: Any = None
        self._val_bar: Any = None
        self._shown_version = -1

    @property
    def process_position(self) -> int:
        return self._process_position

    def _new_bar(self, description: str, position: int, leave: bool, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        return tqdm(desc=description, position=position, leave=leave, dynamic_ncols=True, file=self.stream,
                    bar_format=self.BAR_FORMAT, **kwargs)

    # ------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        super().on_train_epoch_start(trainer, module)
        if not self._draws:
            return
        if self._train_bar is None:  # one bar for the whole fit, or (leave) one per epoch
            self._train_bar = self._new_bar("", 2 * self._process_position, leave=True, smoothing=0)
        self._train_bar.reset(total=finite_or_none(self.total_train_batches))
        self._train_bar.set_description(f"Epoch {trainer.current_epoch}", refresh=False)
        self._shown_version = -1

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar = self._train_bar
        if bar is None:
            return
        n = batch_idx + 1
        if n % self._refresh_rate and n != bar.total:
            return
        bar.update(n - bar.n)  # tqdm redraws at most every `mininterval` seconds
        if trainer.metrics_version != self._shown_version:
            self._shown_version = trainer.metrics_version
            bar.set_postfix(format_metrics(self.get_metrics(trainer, module)), refresh=False)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        super().on_train_epoch_end(trainer, module)
        if self._train_bar is None:
            return
        self._train_bar.set_postfix(format_metrics(self.get_metrics(trainer, module)))
        if self._leave:
            self._close_train_bar()

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self._close_train_bar()

    def _close_train_bar(self) -> None:
        if self._train_bar is not None:
            self._train_bar.close()
            self._train_bar = None

    # ------------------------------------------------------------ validation
    def on_validation_start(self, trainer: Any, module: Any) -> None:
        self.reset_dataloader_idx_tracker()
        if self.is_enabled and self.interactive:
            self.has_dataloader_changed(0)
            in_fit = trainer.state.fn == "fit"
            self._val_bar = self._new_bar(self._val_description(trainer, 0), 2 * self._process_position + in_fit,
                                          leave=not in_fit,
                                          total=finite_or_none(self.total_val_batches_current_dataloader))

    def _val_description(self, trainer: Any, dataloader_idx: int) -> str:
        stage = self.sanity_check_description if trainer.sanity_checking else self.validation_description
        return f"{stage} DataLoader {dataloader_idx}"

    def on_validation_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        bar = self._val_bar
        if bar is None:
            return
        if self.has_dataloader_changed(dataloader_idx):
            bar.reset(total=finite_or_none(self.total_val_batches_current_dataloader))
            bar.set_description(self._val_description(trainer, dataloader_idx), refresh=False)
        n = batch_idx + 1
        if n % self._refresh_rate == 0 or n == bar.total:
            bar.update(n - bar.n)

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        self._close_val_bar()
        self.reset_dataloader_idx_tracker()
        if self._train_bar is not None and trainer.state.fn == "fit":
            self._train_bar.set_postfix(format_metrics(self.get_metrics(trainer, module)))

    def _close_val_bar(self) -> None:
        if self._val_bar is not None:
            self._val_bar.close()
            self._val_bar = None

    def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
        self._close_val_bar()
        self._close_train_bar()
