"""Weights & Biases logger, as Lightning's; the run id goes into checkpoints, so a resumed job continues its run."""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any, Mapping

from torch import Tensor

from distloop.errors import MisconfigurationError
from distloop.extras import require
from distloop.loggers.logger import Logger, rank_zero_experiment
from distloop.rank_zero import rank_zero_only, rank_zero_warn


class WandbLogger(Logger):
    """Lightning's arguments: a W&B run named ``name`` in ``project`` (default ``$WANDB_PROJECT``,
    else ``lightning_logs``), its files under ``save_dir/wandb`` (``dir`` when ``save_dir`` is
    ``None``); ``version`` or ``id`` continues that run; ``offline`` writes it locally only (for
    ``wandb sync``); ``experiment`` is an existing run to log into; other keyword arguments go to
    ``wandb.init`` (``entity``, ``group``, ``tags``, ``mode``...). Metrics are plotted against
    ``trainer/global_step``. ``log_model`` (and so ``checkpoint_name``) is not supported yet.

    The run is started on first use, on global rank zero only. Its id is saved in checkpoints and
    restored before anything is logged, so ``fit(ckpt_path=...)`` (a requeued or restarted job)
    continues the same run instead of starting a new one.
    """

    LOGGER_JOIN_CHAR = "-"

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | os.PathLike | None = ".",
        version: str | None = None,
        offline: bool = False,
        dir: str | os.PathLike | None = None,
        id: str | None = None,
        anonymous: bool | None = None,
        project: str | None = None,
        log_model: bool | str = False,
        prefix: str = "",
        experiment: Any = None,
        checkpoint_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        require("wandb", "wandb", "WandbLogger")
        if log_model is not False:
            raise MisconfigurationError(
                f"WandbLogger(log_model={log_model!r}) is not supported yet: pass log_model=False, and log a "
                "checkpoint yourself with `logger.experiment.log_artifact(...)` once it is written.")
        location = save_dir if save_dir is not None else dir
        self._save_dir = None if location is None else os.fspath(location)
        self._project = project or os.environ.get("WANDB_PROJECT", "lightning_logs")
        self._id = version or id
        self._chosen = self._id is not None or experiment is not None  # the user's run, not the checkpoint's
        self._experiment = experiment
        self._prefix = prefix
        self._init: dict[str, Any] = {"name": name, "project": self._project, "dir": self._save_dir,
                                      "resume": "allow", **kwargs}
        if anonymous:  # passed only when asked for: recent wandb versions warn that it has no effect
            self._init["anonymous"] = "allow"
        if offline:
            self._init.setdefault("mode", "offline")

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``wandb`` run: started on first use (on global rank zero only), continuing ``version``
        when it is known; a run already started in this process is reused."""
        if self._experiment is None:
            import wandb

            if wandb.run is not None:
                if self._id is not None and wandb.run.id != self._id:
                    raise MisconfigurationError(
                        f"WandbLogger continues W&B run {self._id!r}, but run {wandb.run.id!r} is already in "
                        "progress in this process: call `wandb.finish()` before the Trainer starts.")
                if self._id is None:
                    rank_zero_warn("There is a wandb run already in progress and newly created instances of "
                                   "`WandbLogger` will reuse this run. If this is not desired, call "
                                   "`wandb.finish()` before instantiating `WandbLogger`.")
                self._experiment = wandb.run
            else:
                if self._save_dir:
                    os.makedirs(self._save_dir, exist_ok=True)
                self._experiment = wandb.init(id=self._id, **self._init)
                if self._init.get("sync_tensorboard"):
                    self._experiment.define_metric("*", step_metric="global_step")
                else:
                    self._experiment.define_metric("trainer/global_step")
                    self._experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        return self._experiment

    @property
    def name(self) -> str | None:
        """The project (not the run's display name, which is ``experiment.name``)."""
        return self._experiment.project if self._experiment is not None else self._project

    @property
    def version(self) -> str | None:
        """The run's id; ``None`` until the run is started, unless one was given or restored."""
        return self._experiment.id if self._experiment is not None else self._id

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def log_dir(self) -> str | None:
        """``save_dir``, as Lightning's ``trainer.log_dir`` is for this logger (run files: ``save_dir/wandb``)."""
        return self._save_dir

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k:
               v.item() if isinstance(v, Tensor) and v.ndim == 0 else v for k, v in metrics.items()}
        if step is not None and not self._init.get("sync_tensorboard"):
            row["trainer/global_step"] = step
        self.experiment.log(row)

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None) -> None:
        """Into the run's config; a value logged again (a resumed run's) replaces the earlier one."""
        params = vars(params) if isinstance(params, Namespace) else dict(params or {})
        self.experiment.config.update(params, allow_val_change=True)

    @rank_zero_only
    def log_table(self, key: str, columns: list[str] | None = None, data: list[list[Any]] | None = None,
                  dataframe: Any = None, step: int | None = None) -> None:
        """A ``wandb.Table`` from ``columns`` and ``data``, or from a pandas ``dataframe``."""
        import wandb

        self.log_metrics({key: wandb.Table(columns=columns, data=data, dataframe=dataframe)}, step)

    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: list[Any]) -> None:
        """Images (tensors, arrays, PIL images or paths); each keyword is a list with one value per
        image, passed to its ``wandb.Image`` (``caption=[...]``, ``masks=[...]``)."""
        import wandb

        if not isinstance(images, list):
            raise TypeError(f'Expected a list as "images", found {type(images)}')
        for k, v in kwargs.items():
            if len(v) != len(images):
                raise ValueError(f"Expected {len(images)} items but only found {len(v)} for {k}")
        per_image = [{k: v[i] for k, v in kwargs.items()} for i in range(len(images))]
        self.log_metrics({key: [wandb.Image(img, **kw) for img, kw in zip(images, per_image)]}, step)

    def watch(self, model: Any, log: str | None = "gradients", log_freq: int = 100, log_graph: bool = True) -> None:
        """Log ``model``'s gradients (``log="all"``: and parameters) every ``log_freq`` steps."""
        self.experiment.watch(model, log=log, log_freq=log_freq, log_graph=log_graph)

    @rank_zero_only
    def finish(self) -> None:
        """End the W&B run. Lightning leaves it open (a later ``trainer.test`` logs into it); the
        ``distloop`` command ends it after each job, so the jobs of a sweep are separate runs."""
        if self._experiment is not None:
            self._experiment.finish()
            self._experiment = None

    def state_dict(self) -> dict[str, Any]:
        """The run's id (on global rank zero the run is started for it, if nothing has been logged yet)."""
        _ = self.experiment
        return {"id": self.version} if self.version else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved run, unless this logger was given a run of its own (``id``, ``version`` or
        ``experiment``), which it keeps."""
        saved = state_dict.get("id")
        if not saved or saved == self.version:
            return
        if self._chosen:
            rank_zero_warn(f"WandbLogger logs to W&B run {self.version!r}, as it was given, not to run {saved!r} "
                           "saved in the checkpoint.")
            return
        if self._experiment is not None:
            raise MisconfigurationError(
                f"WandbLogger started W&B run {self._experiment.id!r} before the checkpoint's run {saved!r} was "
                f"restored, so the resumed job would log to a new run. Do not use `logger.experiment` before "
                f"`trainer.fit(ckpt_path=...)`, or pass WandbLogger(id={saved!r}).")
        self._id = saved
