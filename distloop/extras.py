"""Optional integrations: import one, or say which extra to install.

``pip install distloop`` stays small; each integration (rich, wandb, mlflow, matplotlib,
tensorboard) is an extra of the same name, and asking for one that is missing names it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from distloop.errors import MisconfigurationError


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise a ``MisconfigurationError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MisconfigurationError(
            f"{feature} needs the `{module.split('.')[0]}` package: `pip install 'distloop[{extra}]'` "
            f"(or `pip install {extra}`).") from err
