"""The Loop contract.

A loop is ``reset``, then ``advance`` until ``done``, framed by hooks::

    if skip: return on_skip()
    reset()
    on_run_start(*args, **kwargs)
    while not done:
        on_advance_start(*args, **kwargs)
        advance(*args, **kwargs)
        on_advance_end()
        restarting = False
    on_run_end()

A ``StopIteration`` from any of the three advance-phase hooks ends the while loop.
Loops nest: any attribute that is a Loop is a child, and ``trainer``, ``restarting``,
``state_dict`` and ``load_state_dict`` recurse into children.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from distloop.errors import MisconfigurationError
from distloop.progress import BaseProgress
from distloop.results import ResultCollection, is_metric

if TYPE_CHECKING:
    from torchmetrics import Metric

T = TypeVar("T")


class Loop(ABC, Generic[T]):
    """Base class of every loop; subclass it and implement ``done``, ``reset`` and ``advance``."""

    def __init__(self) -> None:
        self._restarting = False
        self._trainer: Any = None

    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a Trainer: set `loop.trainer = trainer` "
                "or assign the loop to a Trainer's loop attribute first."
            )
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self._trainer = trainer
        for child in self._children().values():
            child.trainer = trainer

    @property
    def restarting(self) -> bool:
        """True between loading a checkpoint and the first completed advance."""
        return self._restarting

    @restarting.setter
    def restarting(self, restarting: bool) -> None:
        self._restarting = restarting
        for child in self._children().values():
            child.restarting = restarting

    @property
    @abstractmethod
    def done(self) -> bool:
        """Whether the loop has finished."""

    @property
    def skip(self) -> bool:
        """Whether ``run`` should return ``on_skip()`` without running."""
        return False

    def connect(self, **loops: Loop) -> None:
        """Attach child loops; loops with children override this."""

    def replace(self, **loops: Loop | type[Loop]) -> None:
        """Swap child loops by name, for an instance or a class.

        A class is built from the old loop's attributes named like its ``__init__``
        parameters, so it must take the same ``__init__`` signature. The old loop's
        children are connected to the new one.
        """
        new_loops = {}
        for name, loop_or_cls in loops.items():
            old = getattr(self, name)
            if isinstance(loop_or_cls, type):
                old_params = inspect.signature(type(old).__init__).parameters
                new_params = inspect.signature(loop_or_cls.__init__).parameters
                if old_params != new_params:
                    raise MisconfigurationError(
                        f"`{type(self).__name__}.replace({name}={loop_or_cls.__name__})` needs "
                        f"`{loop_or_cls.__name__}.__init__` to take the same parameters as "
                        f"`{type(old).__name__}.__init__` {tuple(old_params)}; it takes "
                        f"{tuple(new_params)}. Pass an instance instead."
                    )
                kwargs = {
                    p.name: getattr(old, p.name)
                    for p in old_params.values()
                    if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                }
                loop = loop_or_cls(**kwargs)
            else:
                loop = loop_or_cls
            children = old._children()
            if children:
                loop.connect(**children)
            if old._trainer is not None:
                loop.trainer = old._trainer
            elif self._trainer is not None:
                loop.trainer = self._trainer
            new_loops[name] = loop
        self.connect(**new_loops)

    def on_skip(self) -> T | None:
        """What ``run`` returns when ``skip`` is True."""
        return None

    def run(self, *args: Any, **kwargs: Any) -> T | None:
        if self.skip:
            return self.on_skip()
        self.reset()
        self.on_run_start(*args, **kwargs)
        while not self.done:
            try:
                self.on_advance_start(*args, **kwargs)
                self.advance(*args, **kwargs)
                self.on_advance_end()
                self._restarting = False
            except StopIteration:
                break
        self._restarting = False
        return self.on_run_end()

    @abstractmethod
    def reset(self) -> None:
        """Prepare the loop's state before a run."""

    def on_run_start(self, *args: Any, **kwargs: Any) -> None:
        """Called once after ``reset``, with ``run``'s arguments."""

    def on_advance_start(self, *args: Any, **kwargs: Any) -> None:
        """Called before each ``advance``."""

    @abstractmethod
    def advance(self, *args: Any, **kwargs: Any) -> None:
        """One step of the loop."""

    def on_advance_end(self) -> None:
        """Called after each ``advance``."""

    def on_run_end(self) -> T | None:
        """Called once at the end; its result is what ``run`` returns."""
        return None

    def teardown(self) -> None:
        """Release resources the loop holds."""

    def clear_state(self) -> None:
        """Back to a fresh run, for the whole tree: zero every progress tracker, forget every
        logged value, not ``restarting``. The Trainer calls it when ``fit`` (or another
        entry point) starts."""
        self.restarting = False
        for value in vars(self).values():
            if isinstance(value, BaseProgress):
                value.reset()
            elif isinstance(value, ResultCollection):
                value.clear()
            elif isinstance(value, Loop):
                value.clear_state()

    def on_save_checkpoint(self) -> dict:
        """Extra state of this loop to checkpoint (plain data and tensors)."""
        return {}

    def on_load_checkpoint(self, state_dict: dict) -> None:
        """Restore what ``on_save_checkpoint`` returned."""

    def state_dict(self, destination: dict | None = None, prefix: str = "") -> dict:
        """This loop's and its children's state, flat, with dotted keys.

        Result collections are synced across ranks before their state is read (a
        collective every rank must take part in) and unsynced after.
        """
        if destination is None:
            destination = {}
        destination[prefix + "state_dict"] = self.on_save_checkpoint()
        for name, value in vars(self).items():
            key = prefix + name
            if isinstance(value, BaseProgress):
                destination[key] = value.state_dict()
            elif isinstance(value, Loop):
                value.state_dict(destination, key + ".")
            elif isinstance(value, ResultCollection):
                value.sync()
                try:
                    destination[key] = value.state_dict()
                finally:
                    value.unsync()
        return destination

    def load_state_dict(
        self, state_dict: dict, prefix: str = "", metrics: dict[str, Metric] | None = None
    ) -> None:
        """Load this loop and its children; afterwards the whole tree is ``restarting``."""
        self._load_from_state_dict(state_dict, prefix, metrics)
        for name, child in self._children().items():
            child.load_state_dict(state_dict, prefix + name + ".", metrics)
        self.restarting = True

    def _load_from_state_dict(
        self, state_dict: dict, prefix: str, metrics: dict[str, Metric] | None
    ) -> None:
        for name, value in vars(self).items():
            key = prefix + name
            if key not in state_dict:  # older checkpoints lack newer keys
                continue
            if isinstance(value, BaseProgress):
                value.load_state_dict(state_dict[key])
            elif isinstance(value, ResultCollection):
                self._load_results(value, state_dict[key], key, metrics)
        if prefix + "state_dict" in state_dict:
            self.on_load_checkpoint(state_dict[prefix + "state_dict"])

    def _load_results(
        self,
        results: ResultCollection,
        state: dict,
        key: str,
        metrics: dict[str, Metric] | None,
    ) -> None:
        trainer = self.trainer
        world_size = getattr(trainer, "world_size", 1)
        if world_size > 1 and not state.get("synced", False):
            raise RuntimeError(
                f"The checkpoint's `{key}` was saved without syncing across ranks, so other "
                f"ranks' values are missing; it cannot resume a run of {world_size} ranks. "
                "Save checkpoints through `Loop.state_dict` / `Trainer.save_checkpoint`."
            )
        module = getattr(trainer, "module", None)
        attached = {}
        if module is not None:
            attached = {n: m for n, m in module.named_modules() if is_metric(m)}
        attached.update(metrics or {})
        results.load_state_dict(state, metrics=attached, sync_fn=trainer.metrics_sync_fn)
        if not getattr(trainer, "is_global_zero", True):
            # Rank zero now holds the cross-rank totals; the others start from the
            # identity so the next sync does not count the totals again.
            results.reset()

    def _children(self) -> dict[str, Loop]:
        return {n: v for n, v in vars(self).items() if isinstance(v, Loop)}
