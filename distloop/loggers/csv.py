"""CSV logger, as Lightning's: ``save_dir/name/version_N/metrics.csv`` plus ``hparams.yaml``."""

from __future__ import annotations

import csv
import os
import warnings
from argparse import Namespace
from typing import Any, Mapping

from torch import Tensor

from distloop.loggers.hparams_file import save_hparams_to_yaml
from distloop.loggers.logger import VersionedLogger, rank_zero_experiment
from distloop.rank_zero import rank_zero_only


class ExperimentWriter:
    """What ``CSVLogger.experiment`` is: buffers rows and writes them to ``metrics.csv``.

    Columns are every key seen, sorted; when a new key appears the file is rewritten with
    the wider header, so it is always a valid CSV.
    """

    NAME_METRICS_FILE = "metrics.csv"
    NAME_HPARAMS_FILE = "hparams.yaml"

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self.metrics: list[dict[str, Any]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        if os.path.isfile(self.metrics_file_path):  # this version's earlier file is replaced, as in Lightning
            warnings.warn(f"Experiment logs directory {log_dir} exists and is not empty. Previous log files in "
                          "this directory will be deleted when the new ones are saved!", stacklevel=2)
            os.remove(self.metrics_file_path)
        os.makedirs(log_dir, exist_ok=True)

    def log_metrics(self, metrics_dict: Mapping[str, Any], step: int | None = None) -> None:
        """Buffer one row; ``step`` defaults to the number of rows buffered."""
        if step is None:
            step = len(self.metrics)
        row = {k: v.item() if isinstance(v, Tensor) else v for k, v in metrics_dict.items()}
        row["step"] = step
        self.metrics.append(row)

    def log_hparams(self, params: Mapping[str, Any]) -> None:
        """Add ``params`` to the run's hyperparameters and rewrite ``hparams.yaml``."""
        self.hparams.update(params)
        save_hparams_to_yaml(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE), self.hparams)

    def save(self) -> None:
        """Write the buffered rows."""
        if not self.metrics:
            return
        new_keys = set().union(*self.metrics) - set(self.metrics_keys)
        self.metrics_keys = sorted([*self.metrics_keys, *new_keys])
        exists = os.path.isfile(self.metrics_file_path)
        if new_keys and exists:
            self._rewrite_with_header()
        with open(self.metrics_file_path, "a" if exists else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            if not exists:
                writer.writeheader()
            writer.writerows(self.metrics)
        self.metrics = []

    def _rewrite_with_header(self) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class CSVLogger(VersionedLogger):
    """Lightning's arguments: rows go to ``save_dir/name/version/metrics.csv`` (``name`` ``None``
    or ``""``: no name level; ``version`` ``None``: the next ``version_N``; a string: that
    folder), keys get ``prefix + "-"``, and the file is written every
    ``flush_logs_every_n_steps`` steps and when the run ends."""

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name, version, prefix)
        self._flush_logs_every_n_steps = flush_logs_every_n_steps
        self._experiment: ExperimentWriter | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer (made on first use, on global rank zero only, which makes the log directory)."""
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ExperimentWriter(self.log_dir)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        metrics = self._prefixed(metrics)
        if step is None:
            step = len(self.experiment.metrics)
        self.experiment.log_metrics(metrics, step)
        if (step + 1) % self._flush_logs_every_n_steps == 0:
            self.save()

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None = None) -> None:
        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        self.experiment.log_hparams(params)

    @rank_zero_only
    def save(self) -> None:
        self.experiment.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:  # nothing was logged: write no files
            self.save()
