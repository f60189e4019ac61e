"""The run's state as named parts: the schema of a checkpoint.

A checkpoint is a header plus one entry per registered part, each part an object with
``state_dict()`` and ``load_state_dict(state)`` (a ``Stateful``). The Trainer registers
the run's parts (module, optimizers, schedulers, precision, loops, callbacks, RNG,
config); adding one, a datamodule's or a custom loop's, is one ``register`` call. Every
rank builds every part (a part may be a collective: the loops sync their metrics, the RNG
part gathers every rank's states, a sharded module gathers nothing but still takes part);
the Strategy decides who writes what. Parts load in the order they were registered, the
RNG streams last (``register_last``).

Where Lightning's checkpoints have a key, the part has that name (``state_dict``,
``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``, ``epoch``,
``global_step``), so code that reads a Lightning checkpoint reads these too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Collection, Protocol, runtime_checkable

from torch import Tensor

from distloop.data.state import DataState
from distloop.checkpoint import FORMAT, HEADER, VERSION, WEIGHTS_ONLY_PARTS, CheckpointError
from distloop.errors import MisconfigurationError
from distloop.hparams import checkpoint_hparams, hparams_name
from distloop.rng import capture_rng, restore_rng


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> None: ...


@dataclass(frozen=True)
class StateFn:
    """A part made of two functions, for state that is not one object (a list, a lookup)."""

    save: Callable[[], Any]
    load: Callable[[Any], None]

    def state_dict(self) -> Any:
        return self.save()

    def load_state_dict(self, state_dict: Any) -> None:
        self.load(state_dict)


# What ``fit`` restores before ``on_fit_start``, as Lightning does; the rest loads after it.
MODULE_PARTS = ("state_dict", "callbacks", "loggers")


class RunState:
    """Named ``Stateful`` parts: what a checkpoint holds and how it is restored.

    Parts load in registration order, except those registered with ``register_last``
    (the RNG streams), which load after every other: loading a part may draw random numbers.
    """

    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}
        self._last: dict[str, Stateful] = {}
        self._records: set[str] = set()

    def register(self, name: str, part: Stateful) -> None:
        """Add ``part`` under ``name`` (saved with every checkpoint, loaded on resume)."""
        self._check(name, part)
        self._parts[name] = part

    def register_record(self, name: str, save: Callable[[], Any]) -> None:
        """Add a record of the run (the config, hyperparameters): saved with every checkpoint,
        never restored, and not missed in a checkpoint without it."""
        self.register(name, StateFn(save, lambda state: None))
        self._records.add(name)

    def register_last(self, name: str, part: Stateful) -> None:
        """Add ``part``, to be loaded after every part ``register`` adds, even later ones."""
        self._check(name, part)
        self._last[name] = part

    def _check(self, name: str, part: Any) -> None:
        if name in HEADER:
            raise ValueError(f"{name!r} is a checkpoint header field, not a part name.")
        if name in self._parts or name in self._last:
            raise ValueError(f"A checkpoint part named {name!r} is registered already.")
        if not isinstance(part, Stateful):
            raise TypeError(f"Checkpoint part {name!r} needs state_dict() and load_state_dict(); "
                            f"{type(part).__name__} lacks them.")

    def state_dict(self, global_step: int, epoch: int, world_size: int,
                   only: Collection[str] | None = None) -> dict[str, Any]:
        """The checkpoint: header, then every part (or the parts named in ``only``). Call it on
        every rank (parts may be collectives)."""
        state: dict[str, Any] = {"format": FORMAT, "version": VERSION, "global_step": global_step,
                                 "epoch": epoch, "world_size": world_size}
        for name, part in {**self._parts, **self._last}.items():
            if only is None or name in only:
                state[name] = part.state_dict()
        return state

    def load_state_dict(self, checkpoint: dict[str, Any], path: str, only: Collection[str] | None = None,
                        skip: Collection[str] = ()) -> None:
        """Restore the parts (those in ``only``, less those in ``skip``) from ``checkpoint``, read
        from ``path`` (named in errors)."""
        for name, part in {**self._parts, **self._last}.items():
            if (only is not None and name not in only) or name in skip or name in self._records:
                continue
            if name not in checkpoint:
                warnings.warn(f"{path} has no {name!r} part; it keeps its current state.", stacklevel=2)
                continue
            part.load_state_dict(checkpoint[name])


def trainer_state(trainer: Any) -> RunState:
    """The parts of a Trainer's run, in load order: the whole checkpoint schema, here.

    The Strategy and its precision plugin are fixed when the Trainer is built; everything
    else is read when a checkpoint is made, so a loop, optimizer or callback set up later
    (``fit_loop`` replaced, ``configure_optimizers`` called) is what is saved.
    """
    strategy = trainer.strategy
    state = RunState()
    state.register("state_dict", StateFn(strategy.module_state_dict, lambda s: _load_module(trainer, s)))
    state.register("optimizer_states", StateFn(
        lambda: [strategy.optimizer_state(o) for o in strategy.optimizers], lambda s: _load_optimizers(trainer, s)))
    state.register("lr_schedulers", StateFn(
        lambda: [c.scheduler.state_dict() for c in strategy.lr_scheduler_configs],
        lambda s: _load_schedulers(trainer, s)))
    state.register("precision", strategy.precision)
    state.register("callbacks", StateFn(
        lambda: {cb.state_key: cb.state_dict() for cb in trainer.callbacks}, lambda s: _load_callbacks(trainer, s)))
    state.register("loggers", StateFn(  # e.g. a tracker's run id, so a resumed job continues that run
        lambda: {lg.state_key: state for lg in trainer.loggers if (state := lg.state_dict())},
        lambda s: _load_loggers(trainer, s)))
    state.register("loops", StateFn(  # syncs logged values across ranks: a collective
        lambda: {"fit_loop": trainer.fit_loop.state_dict()}, lambda s: trainer.fit_loop.load_state_dict(s["fit_loop"])))
    state.register("data", DataState(trainer))  # after the loops: the data fingerprint, stateful loaders per rank
    state.register_record("config", lambda: trainer.config)  # a record of the run, not restored
    # Lightning's keys for the saved hparams, as plain data: what load_from_checkpoint builds the
    # module and datamodule from; nothing to restore in a run, whose objects are built already.
    state.register_record("hyper_parameters", lambda: checkpoint_hparams(trainer.module))
    state.register_record("hparams_name", lambda: hparams_name(trainer.module))
    state.register_record("datamodule_hyper_parameters", lambda: checkpoint_hparams(trainer.datamodule))
    state.register_record("datamodule_hparams_name", lambda: hparams_name(trainer.datamodule))
    state.register_last("rng", StateFn(  # every rank's own streams, restored on the rank of the same number
        lambda: strategy.gather_object(capture_rng()),
        lambda s: restore_rng(s[trainer.global_rank]) if trainer.global_rank < len(s) else None))
    return state


def _load_module(trainer: Any, saved: dict[str, Tensor]) -> None:
    _check_module_state(trainer.module, saved, trainer.ckpt_path)
    trainer.strategy.load_module_state_dict(saved)


def _load_optimizers(trainer: Any, saved: list[dict[str, Any]]) -> None:
    optimizers = trainer.strategy.optimizers
    if not optimizers:  # validate / test / predict restore the module only
        return
    if not saved:
        warnings.warn(f"{trainer.ckpt_path} holds no optimizer state (it was saved outside fit); the "
                      "optimizers start fresh.", stacklevel=2)
        return
    if len(saved) != len(optimizers):
        raise CheckpointError(f"{trainer.ckpt_path} holds {len(saved)} optimizer states; configure_optimizers() "
                              f"made {len(optimizers)} optimizers.")
    for optimizer, optimizer_state in zip(optimizers, saved):
        try:
            trainer.strategy.load_optimizer_state(optimizer, optimizer_state)
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"The optimizer state in {trainer.ckpt_path} does not fit this optimizer: {err}") from err


def _load_schedulers(trainer: Any, saved: list[dict[str, Any]]) -> None:
    configs = trainer.strategy.lr_scheduler_configs
    if len(saved) != len(configs):
        raise CheckpointError(f"{trainer.ckpt_path} holds {len(saved)} LR schedulers; "
                              f"configure_optimizers() made {len(configs)}.")
    for config, scheduler_state in zip(configs, saved):
        config.scheduler.load_state_dict(scheduler_state)


def _load_callbacks(trainer: Any, saved: dict[str, Any]) -> None:
    for cb in trainer.callbacks:
        if cb.state_key in saved:
            cb.load_state_dict(saved[cb.state_key])


def _load_loggers(trainer: Any, saved: dict[str, Any]) -> None:
    for lg in trainer.loggers:
        if lg.state_key in saved:
            lg.load_state_dict(saved[lg.state_key])


def _check_module_state(module: Any, saved: dict[str, Tensor], path: str) -> None:
    """A clear list of what differs, before ``load_state_dict`` fails deep inside."""
    current = module.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(f"{k}: checkpoint {tuple(saved[k].shape)} vs module {tuple(current[k].shape)}"
                    for k in set(current) & set(saved) if saved[k].shape != current[k].shape)
    if missing or unexpected or shapes:
        parts = [f"missing from the checkpoint: {missing}" if missing else "",
                 f"not in the module: {unexpected}" if unexpected else "",
                 f"other shapes: {shapes}" if shapes else ""]
        raise MisconfigurationError(f"{path} does not fit {type(module).__name__}: "
                                    + "; ".join(p for p in parts if p) + ".")
