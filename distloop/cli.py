"""The `distloop` command: compose the Hydra config once, write it into the run directory, train.

Errors a user can fix (bad config, bad module, a non-finite loss) end the command with
a one-paragraph message on stderr and exit code 2, not a stack trace.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from distloop.errors import MisconfigurationError
from distloop.trainer import Trainer

EXIT_USER_ERROR = 2


def config_dir() -> str:
    """The packaged configs in a wheel install, the repository's ``configs/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "configs")


def instantiate(node: Any, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with errors that name the config entry to fix."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise MisconfigurationError(
            f"The `{where}` config needs a `_target_` naming the class to build, e.g. "
            f"`_target_: distloop.examples.digits.DigitsClassifier`; it has {OmegaConf.to_container(node) if isinstance(node, DictConfig) else node!r}.")
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        raise MisconfigurationError(f"Could not build `{where}` ({node._target_}): {err}") from err


def build(cfg: DictConfig, run_dir: str) -> tuple[Trainer, Any, Any]:
    """Trainer, module and datamodule from a composed config."""
    if "trainer" not in cfg or "strategy" not in cfg:
        raise MisconfigurationError("The config needs `trainer` and `strategy` groups (see configs/config.yaml).")
    module = instantiate(cfg.model, "model")
    datamodule = instantiate(cfg.data, "data")
    callbacks = [instantiate(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    loggers = [instantiate(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    strategy = cfg.strategy
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_args, dict)
    try:
        trainer = Trainer(
            **trainer_args,
            strategy=strategy.name,
            accelerator=strategy.accelerator,
            devices=strategy.devices,
            callbacks=callbacks,
            logger=loggers,
            default_root_dir=run_dir,
            seed=cfg.get("seed"),
        )
    except TypeError as err:  # an unknown trainer.<key>
        raise MisconfigurationError(f"Bad `trainer` config: {err}") from err
    return trainer, module, datamodule


def run(cfg: DictConfig, run_dir: str) -> float | None:
    """Train (and test) as the config says; returns the monitored metric for sweeps."""
    os.makedirs(run_dir, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(resolved), os.path.join(run_dir, "config.yaml"))
    trainer, module, datamodule = build(cfg, run_dir)
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_hyperparams(resolved)
    trainer.fit(module, datamodule=datamodule)
    if cfg.get("test_after_fit", False):
        trainer.test(module, datamodule=datamodule)
    if trainer.is_global_zero:
        print(f"distloop: run directory {run_dir}", file=sys.stderr)
    objective = cfg.get("objective")
    if objective and objective in trainer.callback_metrics:
        return float(trainer.callback_metrics[objective])
    return None


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> float | None:
    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)
    except (MisconfigurationError, FloatingPointError) as err:
        print(f"distloop: error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def main() -> None:
    """Console entry point (`distloop` and `python -m distloop`)."""
    _hydra_app()
