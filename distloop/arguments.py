"""The Trainer's argument checks: each bad value is refused when the Trainer is built, saying what to change."""

from __future__ import annotations

import math
from typing import Any

from distloop.errors import MisconfigurationError

NAN_POLICIES = ("raise", "skip", "ignore")


def check_trainer_arguments(*, max_epochs: int, min_epochs: int | None, max_steps: int,
                            limits: dict[str, int | float], val_check_interval: int | float,
                            check_val_every_n_epoch: int, num_sanity_val_steps: int,
                            accumulate_grad_batches: int, log_every_n_steps: int,
                            gradient_clip_val: float | None, gradient_clip_algorithm: str, nan_loss: str) -> None:
    """Every check of ``Trainer.__init__``'s arguments; ``max_epochs`` already has its default."""
    _check_int("max_epochs", max_epochs, minimum=-1)
    if max_epochs == 0:
        raise MisconfigurationError("max_epochs=0 trains nothing: use max_epochs >= 1, or -1 for no limit.")
    _check_int("min_epochs", min_epochs or 0, minimum=0)
    _check_int("max_steps", max_steps, minimum=-1)
    for name, limit in limits.items():
        _check_limit(name, limit)
    _check_interval(val_check_interval)
    _check_int("check_val_every_n_epoch", check_val_every_n_epoch, minimum=1)
    _check_int("num_sanity_val_steps", num_sanity_val_steps, minimum=-1)
    _check_int("accumulate_grad_batches", accumulate_grad_batches, minimum=1)
    _check_int("log_every_n_steps", log_every_n_steps, minimum=1)
    if gradient_clip_val is not None and gradient_clip_val < 0:
        raise MisconfigurationError(f"gradient_clip_val={gradient_clip_val} must be >= 0 (or None for no clipping).")
    if gradient_clip_algorithm not in ("norm", "value"):
        raise MisconfigurationError(f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'.")
    if nan_loss not in NAN_POLICIES:
        raise MisconfigurationError(f"nan_loss={nan_loss!r}: use one of {NAN_POLICIES}.")


def val_check_batches(interval: int | float, num_training_batches: float) -> int | None:
    """Validate every this many training batches; ``None``: once per epoch, at its end."""
    if isinstance(interval, float):
        if interval == 1.0:
            return None
        if math.isinf(num_training_batches):
            raise MisconfigurationError(
                f"val_check_interval={interval} is a fraction of an epoch, but the training data has no "
                "length: pass an int (every N batches) instead.")
        return max(1, int(num_training_batches * interval))
    return interval


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = " (-1 means no limit)" if minimum == -1 else ""
        raise MisconfigurationError(f"{name}={value!r} must be an int >= {minimum}{hint}.")


def _check_limit(name: str, limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise MisconfigurationError(f"{name}={limit!r}: pass a fraction (float in [0, 1]) or a number of batches (int).")
    if isinstance(limit, float) and not 0.0 <= limit <= 1.0:
        raise MisconfigurationError(f"{name}={limit} is a fraction and must be in [0, 1]; for a number of batches pass an int.")
    if isinstance(limit, int) and limit < 0:
        raise MisconfigurationError(f"{name}={limit} must be >= 0.")


def _check_interval(interval: Any) -> None:
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise MisconfigurationError(f"val_check_interval={interval!r}: pass a fraction of an epoch (float) or a number of batches (int).")
    if isinstance(interval, float) and not 0.0 < interval <= 1.0:
        raise MisconfigurationError(f"val_check_interval={interval} must be in (0, 1] as a fraction, or an int number of batches.")
    if isinstance(interval, int) and interval < 1:
        raise MisconfigurationError(f"val_check_interval={interval} must be >= 1 batches.")
