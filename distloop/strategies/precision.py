"""Numeric precision: the autocast context, backward and optimizer step for "32", "bf16-mixed", "16-mixed"."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager

import torch
from torch import Tensor
from torch.optim import Optimizer

from distloop.errors import MisconfigurationError

NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing; callers may skip it by identity
_ALIASES = {
    "32": "32", "32-true": "32", 32: "32",
    "bf16-mixed": "bf16-mixed", "bf16": "bf16-mixed",
    "16-mixed": "16-mixed", "16": "16-mixed", 16: "16-mixed",
}


def normalize_precision(precision: Any) -> str:
    if precision not in _ALIASES:
        raise MisconfigurationError(
            f"precision={precision!r} is not supported: use '32', 'bf16-mixed' or '16-mixed'."
        )
    return _ALIASES[precision]


class Precision:
    """Runs forward under autocast and backward/step with a GradScaler where fp16 needs one."""

    def __init__(self, precision: Any, device: torch.device) -> None:
        self.precision = normalize_precision(precision)
        self.device = device
        if self.precision == "16-mixed" and device.type == "cpu":  # what Lightning does, with its warning
            warnings.warn("You passed precision='16-mixed' on CPU, but AMP with fp16 is not supported on CPU. "
                          "Using precision='bf16-mixed' instead.", stacklevel=2)
            self.precision = "bf16-mixed"
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "16-mixed" else None

    def autocast(self) -> ContextManager:
        if self.precision == "32":
            return NO_CONTEXT
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_gradients(self, optimizer: Optimizer) -> None:
        """Before clipping: bring fp16-scaled gradients back to their true size."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, optimizer: Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
