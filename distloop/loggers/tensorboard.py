"""TensorBoard logger, as Lightning's, through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package)."""

from __future__ import annotations

import os
from argparse import Namespace
from dataclasses import asdict, is_dataclass
from typing import Any, Mapping

from torch import Tensor

from distloop.errors import MisconfigurationError
from distloop.loggers.hparams_file import save_hparams_to_yaml
from distloop.loggers.logger import VersionedLogger, rank_zero_experiment
from distloop.rank_zero import rank_zero_only, rank_zero_warn


class TensorBoardLogger(VersionedLogger):
    """Lightning's arguments: event files go to ``save_dir/name/version[/sub_dir]`` (``name``
    ``None`` or ``""``: no name level; ``version`` ``None``: the next ``version_N``; a string:
    that folder); ``default_hp_metric`` logs ``hp_metric=-1`` with the hyperparameters so
    TensorBoard's HPARAMS tab shows them; ``log_graph`` records the module's graph from its
    ``example_input_array``; other keyword arguments go to ``SummaryWriter``. The
    hyperparameters are also written to ``hparams.yaml`` in ``log_dir`` when it saves."""

    NAME_HPARAMS_FILE = "hparams.yaml"
    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        save_dir: str | os.PathLike,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise MisconfigurationError(
                "TensorBoardLogger needs the `tensorboard` package: `pip install tensorboard` "
                "(or `pip install distloop[tensorboard]`), or use logger=csv."
            ) from err
        super().__init__(save_dir, name, version, prefix)
        self._log_graph = log_graph
        self._default_hp_metric = default_hp_metric
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._kwargs = kwargs
        self._experiment: Any = None
        self.hparams: dict[str, Any] = {}

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def log_dir(self) -> str:
        log_dir = super().log_dir
        if self.sub_dir is not None:
            log_dir = os.path.join(log_dir, self.sub_dir)
        return os.path.expanduser(os.path.expandvars(log_dir))

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``SummaryWriter`` (made on first use, on global rank zero only)."""
        if self._experiment is None:
            from torch.utils.tensorboard import SummaryWriter

            if self.root_dir:
                os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = SummaryWriter(log_dir=self.log_dir, **self._kwargs)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for name, value in self._prefixed(metrics).items():
            value = value.item() if isinstance(value, Tensor) else value
            if isinstance(value, dict):
                self.experiment.add_scalars(name, value, step)
                continue
            try:
                self.experiment.add_scalar(name, value, step)
            except Exception as err:
                raise ValueError(f"\n you tried to log {value} which is currently not supported. "
                                 "Try a dict or a scalar/tensor.") from err

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace, metrics: Mapping[str, Any] | Any = None,
                        step: int | None = None) -> None:
        """Keep ``params`` for ``hparams.yaml`` and record them, flattened, in the HPARAMS tab."""
        from torch.utils.tensorboard.summary import hparams

        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        self.hparams.update(params)
        if metrics is None:
            metrics = {"hp_metric": -1} if self._default_hp_metric else None
        elif not isinstance(metrics, Mapping):
            metrics = {"hp_metric": metrics}
        if not metrics:
            return
        self.log_metrics(metrics, step)
        writer = self.experiment._get_file_writer()
        for summary in hparams(_sanitize(_flatten(params)), dict(metrics)):
            writer.add_summary(summary, step)

    @rank_zero_only
    def log_graph(self, model: Any, input_array: Any = None) -> None:
        if not self._log_graph:
            return
        input_array = getattr(model, "example_input_array", None) if input_array is None else input_array
        if input_array is None:
            rank_zero_warn("Could not log computational graph to TensorBoard: The `model.example_input_array` "
                           "attribute is not set or `input_array` was not given.")
        elif not isinstance(input_array, (Tensor, tuple)):
            rank_zero_warn("Could not log computational graph to TensorBoard: The `input_array` or "
                           f"`model.example_input_array` has type {type(input_array)} which can't be traced by "
                           "TensorBoard. Make the input array a tuple representing the positional arguments to "
                           "the model's `forward()` implementation.")
        else:
            self.experiment.add_graph(model, input_array)

    @rank_zero_only
    def save(self) -> None:
        self.experiment.flush()
        path = os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)
        if os.path.isdir(self.log_dir) and not os.path.isfile(path):
            save_hparams_to_yaml(path, self.hparams)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.flush()
            self._experiment.close()
        if status == "success":
            self.save()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_experiment"] = None  # a writer holds an open file: a copy makes its own
        return state


def _flatten(params: Mapping[Any, Any], parent: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; a list of mappings is flattened by index."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{parent}/{key}" if parent else str(key)
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        elif isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(_flatten(item, f"{name}/{i}"))
        else:
            out[name] = value
    return out


def _sanitize(params: dict[str, Any]) -> dict[str, Any]:
    """What TensorBoard's HPARAMS tab can hold: numbers, strings, booleans and scalar tensors; the rest as text."""
    out = {}
    for key, value in params.items():
        if hasattr(value, "item") and not isinstance(value, Tensor) and getattr(value, "ndim", 1) == 0:
            value = value.item()  # a numpy scalar
        if type(value) not in (bool, int, float, str, Tensor) or (isinstance(value, Tensor) and value.ndim > 1):
            value = str(value)
        out[key] = value
    return out
