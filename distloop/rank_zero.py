"""Side effects that must happen once per job, on global rank zero: printing, writing files."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

from distloop.strategies.ddp import distributed_env

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("distloop")


def rank_zero_only(fn: F) -> F:
    """Run ``fn`` on global rank zero only (others get ``None``); the rank comes from the launcher's environment."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if distributed_env()[0] == 0:
            return fn(*args, **kwargs)
        return None

    return wrapped  # type: ignore[return-value]


@rank_zero_only
def rank_zero_info(message: str) -> None:
    log.info(message)


@rank_zero_only
def rank_zero_warn(message: str) -> None:
    log.warning(message)
