"""TensorBoard logger through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package)."""

from __future__ import annotations

import os
from typing import Any

from distloop.errors import MisconfigurationError
from distloop.loggers.logger import Logger


class TensorBoardLogger(Logger):
    def __init__(self, save_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise MisconfigurationError(
                "TensorBoardLogger needs the `tensorboard` package: `pip install tensorboard` "
                "(or `pip install distloop[tensorboard]`), or use logger=csv."
            ) from err
        self._dir = os.path.join(os.fspath(save_dir), "tensorboard")
        self._writer_cls = SummaryWriter
        self._writer_obj: Any = None

    @property
    def _writer(self) -> Any:
        # Made on first use, which is on global rank zero only: other ranks write no files.
        if self._writer_obj is None:
            self._writer_obj = self._writer_cls(self._dir)
        return self._writer_obj

    @property
    def log_dir(self) -> str:
        return self._dir

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, step)

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        flat = _flatten(params)
        self._writer.add_text("hparams", "\n".join(f"    {k}: {v}" for k, v in flat.items()))

    def save(self) -> None:
        self._writer.flush()

    def finalize(self, status: str) -> None:
        if self._writer_obj is not None:
            self._writer_obj.close()


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out
