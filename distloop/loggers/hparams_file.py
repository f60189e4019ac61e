"""``hparams.yaml``: the run's hyperparameters, written as Lightning writes them."""

from __future__ import annotations

import copy
import os
import warnings
from enum import Enum
from typing import Any, Mapping

import yaml


def save_hparams_to_yaml(path: str, hparams: Mapping[str, Any]) -> None:
    """Write ``hparams`` to ``path`` through OmegaConf (configs resolved); when OmegaConf cannot
    hold a value, plain YAML of the values it can dump, with a warning naming each one left out."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import UnsupportedValueType, ValidationError

    if not os.path.isdir(os.path.dirname(path) or "."):
        raise RuntimeError(f"Missing folder: {os.path.dirname(path)}.")
    if isinstance(hparams, DictConfig):
        hparams = OmegaConf.to_container(hparams, resolve=True)
    plain = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
             for k, v in copy.deepcopy(dict(hparams)).items()}
    with open(path, "w", encoding="utf-8") as f:
        try:
            OmegaConf.save(plain, f)
            return
        except (UnsupportedValueType, ValidationError):
            pass
    allowed = {}
    for key, value in plain.items():
        value = value.name if isinstance(value, Enum) else value
        try:
            yaml.dump(value)
        except (TypeError, ValueError):
            warnings.warn(f"Skipping '{key}' parameter because it is not possible to safely dump to YAML.",
                          stacklevel=2)
        else:
            allowed[key] = value
    with open(path, "w", newline="") as f:
        yaml.dump(allowed, f)
