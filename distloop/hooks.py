"""Dispatch of a hook to the callbacks and the module that override it.

Callbacks first, then the module: Lightning's order. At the epoch ends, where logged values
are read and synced, Lightning's exception too: the other callbacks, the module, the read,
then the monitoring callbacks (``ModelCheckpoint``, ``EarlyStopping``), so that they see
everything logged there. A hook that nobody overrides costs one set lookup.
"""

from __future__ import annotations

from typing import Any, Callable

from distloop.callbacks import Callback, EarlyStopping, ModelCheckpoint
from distloop.module import LoopModule


class Hooks:
    def __init__(self, trainer: Any, module: LoopModule, callbacks: list[Callback]) -> None:
        self._trainer = trainer
        self._module = module
        self._callbacks = callbacks
        self._module_fns: dict[str, Callable | None] = {}
        self._callback_fns: dict[str, list[Callable]] = {}
        self._silent: set[str] = set()

    def module(self, name: str, *args: Any) -> Any:
        fn = self._module_fns.get(name, False)
        if fn is False:
            fn = _overridden(self._module, LoopModule, name)
            self._module_fns[name] = fn
        if fn is None:
            return None
        ctx = self._module.log_context
        previous, ctx.fx = ctx.fx, name
        try:
            return fn(*args)
        finally:
            ctx.fx = previous

    def callbacks(self, name: str, *args: Any, monitoring: bool | None = None) -> None:
        """Call the callbacks' ``name``: all of them, or (at the epoch ends, as Lightning splits them)
        only the monitoring ones (``ModelCheckpoint``, ``EarlyStopping``: ``True``) or the others (``False``)."""
        key = name if monitoring is None else f"{name}/{monitoring}"
        fns = self._callback_fns.get(key)
        if fns is None:
            fns = [fn for cb in self._callbacks if (fn := _overridden(cb, Callback, name)) is not None
                   and (monitoring is None or isinstance(cb, (ModelCheckpoint, EarlyStopping)) == monitoring)]
            self._callback_fns[key] = fns
        if not fns:
            return
        module = self._module
        ctx = module.log_context
        previous, ctx.fx = ctx.fx, name
        try:
            for fn in fns:
                fn(self._trainer, module, *args)
        finally:
            ctx.fx = previous

    def overridden_by_callbacks(self, name: str) -> bool:
        """Whether some callback overrides ``name`` (a caller may then skip a hot-path dispatch)."""
        return any(_overridden(cb, Callback, name) is not None for cb in self._callbacks)

    def may_set_should_stop(self, name: str) -> bool:
        """Whether a callback's ``name`` hook may have set ``should_stop`` (the same answer on every rank)."""
        return any(cb.may_set_should_stop and _overridden(cb, Callback, name) is not None for cb in self._callbacks)

    def __call__(self, name: str, *args: Any) -> Any:
        if name in self._silent:
            return None
        self.callbacks(name, *args)
        out = self.module(name, *args)
        if self._module_fns[name] is None and not self._callback_fns[name]:
            self._silent.add(name)  # nobody overrides it: later calls cost one set lookup
        return out


def _overridden(obj: Any, base: type, name: str) -> Callable | None:
    if getattr(type(obj), name, None) is getattr(base, name, None):
        return None
    return getattr(obj, name)
