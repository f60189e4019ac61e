"""CSV logger: one ``metrics.csv`` per run, plus ``hparams.yaml``."""

from __future__ import annotations

import csv
import os
from typing import Any

from distloop.loggers.logger import Logger


class CSVLogger(Logger):
    """Rows are written as they come; when a new metric name appears, the file is rewritten
    with the wider header, so the file is always a valid CSV that pandas can read."""

    def __init__(self, save_dir: str, flush_every: int = 1) -> None:
        self._dir = os.fspath(save_dir)
        self.path = os.path.join(self._dir, "metrics.csv")
        self.flush_every = flush_every
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = []
        self._written = 0

    @property
    def log_dir(self) -> str:
        return self._dir

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._rows.append({"step": step, **metrics})
        if len(self._rows) - self._written >= self.flush_every:
            self.save()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        from omegaconf import OmegaConf

        os.makedirs(self._dir, exist_ok=True)
        OmegaConf.save(OmegaConf.create(params), os.path.join(self._dir, "hparams.yaml"))

    def save(self) -> None:
        pending = self._rows[self._written:]
        if not pending:
            return
        os.makedirs(self._dir, exist_ok=True)
        columns = list(self._columns)
        for row in pending:
            columns.extend(k for k in row if k not in columns)
        if columns != self._columns or self._written == 0:
            self._columns = columns
            rows, mode = self._rows, "w"
        else:
            rows, mode = pending, "a"
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)
        self._written = len(self._rows)
