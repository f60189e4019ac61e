"""Turn the Trainer's ``logger`` argument into loggers, or say what to change."""

from __future__ import annotations

import os

from distloop.errors import MisconfigurationError
from distloop.loggers.csv import CSVLogger
from distloop.loggers.logger import Logger


def resolve_loggers(logger: bool | Logger | list[Logger] | None, default_root_dir: str,
                    is_global_zero: bool) -> list[Logger]:
    """``True``: a CSVLogger in ``<default_root_dir>/lightning_logs/version_N``; ``False`` / ``None``: none."""
    if logger is True:
        default = CSVLogger(default_root_dir)
        if is_global_zero:
            os.makedirs(default.log_dir, exist_ok=True)  # taken now, so the next Trainer takes the next version
        return [default]
    if not logger:
        return []
    loggers = [logger] if isinstance(logger, Logger) else list(logger)
    for lg in loggers:
        if not isinstance(lg, Logger):
            raise MisconfigurationError(f"logger={lg!r} is not a distloop Logger (CSVLogger, TensorBoardLogger, WandbLogger, MLFlowLogger, or a subclass of distloop.loggers.Logger).")
    return loggers
