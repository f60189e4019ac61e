"""MLflow logger, as Lightning's; the run id goes into checkpoints, so a resumed job continues its run."""

from __future__ import annotations

import os
import re
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from distloop.errors import MisconfigurationError
from distloop.extras import require
from distloop.loggers.logger import Logger, rank_zero_experiment
from distloop.loggers.tensorboard import _flatten
from distloop.rank_zero import rank_zero_only, rank_zero_warn

_RUN_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class MLFlowLogger(Logger):
    """Lightning's arguments: a run (named ``run_name``, with ``tags``) in the experiment
    ``experiment_name``, created with ``artifact_location`` if it does not exist; ``run_id``
    continues that run; ``synchronous`` is passed to each ``log_batch``. ``log_model`` is not
    supported yet.

    The tracking store is ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store
    ``save_dir/mlflow.db`` with artifacts in ``save_dir/artifacts`` (Lightning's default, a file
    store in ``save_dir``, is refused by MLflow 3). Nothing touches the store until the first use,
    on global rank zero only. The run id is saved in checkpoints and restored before anything is
    logged, so ``fit(ckpt_path=...)`` continues the same run; hyperparameters the run already
    has are not logged again (MLflow cannot change them).
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        experiment_name: str = "lightning_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        save_dir: str | os.PathLike | None = "./mlruns",
        log_model: bool | str = False,
        prefix: str = "",
        artifact_location: str | None = None,
        run_id: str | None = None,
        synchronous: bool | None = None,
    ) -> None:
        require("mlflow", "mlflow", "MLFlowLogger")
        if log_model is not False:
            raise MisconfigurationError(
                f"MLFlowLogger(log_model={log_model!r}) is not supported yet: pass log_model=False, and log a "
                "checkpoint yourself with `logger.experiment.log_artifact(logger.run_id, path)` once it is written.")
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self._store_dir: str | None = None
        if not tracking_uri:
            if save_dir is None:
                raise MisconfigurationError("MLFlowLogger needs a tracking store: pass tracking_uri=..., set "
                                            "MLFLOW_TRACKING_URI, or pass save_dir=... for a local one.")
            self._store_dir = os.path.abspath(save_dir)
            tracking_uri = f"sqlite:///{self._store_dir}/mlflow.db"
            artifact_location = artifact_location or Path(self._store_dir, "artifacts").as_uri()
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._run_name = run_name
        self._run_id = run_id
        self._chosen = run_id is not None  # the user's run, not the checkpoint's
        self.tags = tags
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._log_batch_kwargs = {} if synchronous is None else {"synchronous": synchronous}
        self._client: Any = None

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``MlflowClient``; on first use (global rank zero only) the experiment and the run are
        found or created, and a continued run is marked running again."""
        if self._client is None:
            import mlflow
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            if self._store_dir is not None:
                os.makedirs(self._store_dir, exist_ok=True)
            client = MlflowClient(self._tracking_uri)
            mlflow.set_tracking_uri(self._tracking_uri)  # so mlflow's own functions in user code log there too
            if self._run_id is not None:
                try:
                    run = client.get_run(self._run_id)
                except MlflowException as err:
                    raise MisconfigurationError(
                        f"MLflow run {self._run_id!r} (given as run_id or saved in the checkpoint) is not in the "
                        f"tracking store {self._tracking_uri}: point tracking_uri at the store that holds it.") from err
                self._experiment_id = run.info.experiment_id
                if run.info.status != "RUNNING":
                    client.update_run(self._run_id, status="RUNNING")
            else:
                self._experiment_id = self._find_or_create_experiment(client)
                self._run_id = client.create_run(experiment_id=self._experiment_id, tags=self._run_tags()).info.run_id
            self._client = client
        return self._client

    def _find_or_create_experiment(self, client: Any) -> str:
        found = client.get_experiment_by_name(self._experiment_name)
        if found is not None and found.lifecycle_stage != "deleted":
            return found.experiment_id
        return client.create_experiment(name=self._experiment_name, artifact_location=self._artifact_location)

    def _run_tags(self) -> dict[str, Any]:
        """``tags`` with ``run_name`` as MLflow's run-name tag, plus MLflow's own (source, user, git commit)."""
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        if self._run_name is not None:
            self.tags = dict(self.tags or {})
            if MLFLOW_RUN_NAME in self.tags:
                rank_zero_warn(f"The tag {MLFLOW_RUN_NAME} is found in tags. The value will be overridden by "
                               f"{self._run_name}.")
            self.tags[MLFLOW_RUN_NAME] = self._run_name
        return resolve_tags(self.tags)

    @property
    def run_id(self) -> str | None:
        """The run's id (the run is created on global rank zero if it does not exist yet)."""
        _ = self.experiment
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id (found or created on global rank zero if not known yet)."""
        _ = self.experiment
        return self._experiment_id

    @property
    def name(self) -> str | None:
        """The experiment's id, as in Lightning."""
        return self.experiment_id

    @property
    def version(self) -> str | None:
        """The run's id, as in Lightning."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local directory holding the tracking store, or ``None`` for a remote one."""
        if self._store_dir is not None:
            return self._store_dir
        uri = urlparse(self._tracking_uri)
        if uri.scheme == "file":
            return uri.path
        if uri.scheme == "sqlite" and self._tracking_uri.startswith("sqlite:///"):
            return os.path.dirname(self._tracking_uri[len("sqlite:///"):]) or "."
        return None

    @property
    def log_dir(self) -> str | None:
        """``save_dir``, as Lightning's ``trainer.log_dir`` is for this logger."""
        return self.save_dir

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None) -> None:
        """Flattened (``{"a": {"b": 1}}`` as ``a/b``), each value as text; those the run already has are
        skipped, and a changed one is kept at its first value, with a warning."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        params = _flatten(vars(params) if isinstance(params, Namespace) else dict(params or {}))
        values = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        logged = self.experiment.get_run(self.run_id).data.params
        changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
        if changed:
            rank_zero_warn(f"MLflow run {self.run_id} keeps its first values of {changed}: MLflow cannot change "
                           "a logged parameter.")
        new = [Param(key=k, value=v) for k, v in values.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per call
            self.experiment.log_batch(run_id=self.run_id, params=new[i:i + 100], **self._log_batch_kwargs)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numbers only (a string is dropped, with a warning); characters MLflow refuses in a name are removed."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            key = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
            if isinstance(value, str):
                rank_zero_warn(f"Discarding metric with string value {key}={value}.")
                continue
            allowed = re.sub("[^a-zA-Z0-9_/. -]+", "", key)
            if allowed != key:
                rank_zero_warn("MLFlow only allows '_', '/', '.' and ' ' special characters in metric name. "
                               f"Replacing {key} with {allowed}.")
            batch.append(Metric(key=allowed, value=float(value), timestamp=timestamp_ms, step=step or 0))
        self.experiment.log_batch(run_id=self.run_id, metrics=batch, **self._log_batch_kwargs)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Mark the run FINISHED, FAILED or KILLED (nothing when no run was started)."""
        if self._client is not None:
            self._client.set_terminated(self._run_id, _RUN_STATUS.get(status, status))

    def state_dict(self) -> dict[str, Any]:
        """The run's id (on global rank zero the run is created for it, if nothing has been logged yet)."""
        return {"run_id": self.run_id} if self.run_id else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved run, unless this logger was given ``run_id``, which it keeps."""
        saved = state_dict.get("run_id")
        if not saved or saved == self._run_id:
            return
        if self._chosen:
            rank_zero_warn(f"MLFlowLogger logs to MLflow run {self._run_id!r}, as it was given, not to run "
                           f"{saved!r} saved in the checkpoint.")
            return
        if self._client is not None:
            raise MisconfigurationError(
                f"MLFlowLogger created MLflow run {self._run_id!r} before the checkpoint's run {saved!r} was "
                f"restored, so the resumed job would log to a new run. Do not use `logger.experiment` (or "
                f"`run_id`) before `trainer.fit(ckpt_path=...)`, or pass MLFlowLogger(run_id={saved!r}).")
        self._run_id = saved
