"""Optimizers and LR schedulers from ``configure_optimizers``, when each scheduler steps, and
``LoopOptimizer``, the wrapper ``LoopModule.optimizers()`` returns.

``configure_optimizers`` may return what Lightning accepts: ``None`` (train without an
optimizer, with a warning); an optimizer; a list or tuple of them; ``([optimizers],
[schedulers])``; ``{"optimizer": ..., "lr_scheduler": ..., "monitor": ...}``; or a list or
tuple of such dicts. A scheduler may be a dict with ``scheduler``, ``interval`` ("epoch" or
"step"), ``frequency``, ``monitor`` (for ``ReduceLROnPlateau``), ``strict``, ``name`` and
``reduce_on_plateau``, with Lightning's defaults. Automatic optimization takes one optimizer;
several need manual optimization, where the user steps the schedulers too.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import Tensor
from torch.optim import Optimizer

from distloop.errors import MisconfigurationError


@dataclass
class LRSchedulerConfig:
    """One scheduler and when it steps (Lightning's names and defaults)."""

    scheduler: Any
    name: str | None = None
    interval: str = "epoch"
    frequency: int = 1
    reduce_on_plateau: bool = False
    monitor: str | None = None
    strict: bool = True  # a missing monitored value raises (False: warns and skips the step)


@dataclass
class OptimizerSetup:
    """What ``configure_optimizers`` returned, parsed."""

    optimizers: list[Optimizer]
    lr_scheduler_configs: list[LRSchedulerConfig]


def parse_optimizers(config: Any, automatic_optimization: bool = True,
                     training_step: Callable | None = None) -> OptimizerSetup:
    """``configure_optimizers``' return value, checked as Lightning checks it.

    ``training_step`` (when given) is checked for Lightning 1.x's ``optimizer_idx`` argument.
    """
    if config is None:
        warnings.warn("configure_optimizers() returned None: this fit runs without an optimizer.", stacklevel=2)
        config = NoOptimizer()
    optimizers, schedulers, monitor = _split(config)
    if automatic_optimization:
        configs = [_automatic_scheduler_config(s, monitor) for s in schedulers]
    else:
        configs = [_manual_scheduler_config(s) for s in schedulers]
    _check_several_optimizers(optimizers, automatic_optimization, training_step)
    _check_schedulers(configs, optimizers)
    return OptimizerSetup(list(optimizers), configs)


_OPTIMIZER_KEYS = {"optimizer", "lr_scheduler", "monitor"}


def _split(config: Any) -> tuple[list[Any], list[Any], str | None]:
    """``(optimizers, schedulers, monitor)`` from any of Lightning's forms, in Lightning's order of tests."""
    if _is_optimizer(config):
        return [config], [], None
    if (isinstance(config, (list, tuple)) and len(config) == 2 and isinstance(config[0], list)
            and all(_is_optimizer(o) for o in config[0])):
        optimizers, schedulers = config
        return list(optimizers), list(schedulers) if isinstance(schedulers, list) else [schedulers], None
    if isinstance(config, dict):
        _check_optimizer_dict(config)
        schedulers = [config["lr_scheduler"]] if "lr_scheduler" in config else []
        return [config["optimizer"]], schedulers, config.get("monitor")
    if isinstance(config, (list, tuple)) and all(isinstance(d, dict) for d in config):
        for d in config:
            _check_optimizer_dict(d)
        schedulers = [dict(d["lr_scheduler"]) if isinstance(d["lr_scheduler"], dict) else {"scheduler": d["lr_scheduler"]}
                      for d in config if "lr_scheduler" in d]
        return [d["optimizer"] for d in config], schedulers, None
    if isinstance(config, (list, tuple)) and all(_is_optimizer(o) for o in config):
        return list(config), [], None
    raise MisconfigurationError(
        f"configure_optimizers() returned {type(config).__name__}, which is none of the accepted forms: "
        "an optimizer; a list of optimizers; ([optimizers], [schedulers]); "
        "{'optimizer': ..., 'lr_scheduler': ...}; or a list of such dicts.")


def _is_optimizer(obj: Any) -> bool:
    """A torch optimizer, or anything shaped like one (Lightning accepts both)."""
    return isinstance(obj, Optimizer) or all(
        hasattr(obj, a) for a in ("step", "param_groups", "defaults", "state", "state_dict", "load_state_dict"))


def _check_optimizer_dict(config: dict) -> None:
    if "optimizer" not in config:
        raise MisconfigurationError("configure_optimizers() returned a dict without an 'optimizer' key.")
    unknown = set(config) - _OPTIMIZER_KEYS
    if unknown:
        warnings.warn(f"configure_optimizers(): ignoring unknown keys {sorted(unknown)} of an optimizer dict.",
                      RuntimeWarning, stacklevel=3)


def _check_several_optimizers(optimizers: list[Any], automatic: bool, training_step: Callable | None) -> None:
    if training_step is not None and "optimizer_idx" in _parameter_names(training_step):
        raise MisconfigurationError(
            "training_step takes `optimizer_idx`, which Lightning 2.x no longer passes: remove it, set "
            "`self.automatic_optimization = False` and step each optimizer of `self.optimizers()` yourself.")
    if automatic and len(optimizers) > 1:
        raise MisconfigurationError(
            f"Automatic optimization takes exactly one torch optimizer; configure_optimizers() gave "
            f"{len(optimizers)}. To train with several, use manual optimization: set "
            "`self.automatic_optimization = False` in __init__, then in training_step take "
            "`opt_a, opt_b = self.optimizers()` and call `self.manual_backward(loss)`, `opt_a.step()`, "
            "`opt_a.zero_grad()` yourself.")


def _parameter_names(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _check_schedulers(configs: list[LRSchedulerConfig], optimizers: list[Any]) -> None:
    for c in configs:
        if not any(getattr(c.scheduler, "optimizer", None) is o for o in optimizers):
            raise MisconfigurationError("An LR scheduler from configure_optimizers() steps an optimizer that "
                                        "configure_optimizers() did not return.")
        if not (hasattr(c.scheduler, "state_dict") and hasattr(c.scheduler, "load_state_dict")):
            raise TypeError(f"The LR scheduler {type(c.scheduler).__name__} cannot be checkpointed: it needs "
                            "state_dict() and load_state_dict().")


_SCHEDULER_KEYS = {f.name for f in fields(LRSchedulerConfig)}


def _automatic_scheduler_config(entry: Any, monitor: str | None) -> LRSchedulerConfig:
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    if not isinstance(entry, dict):
        if isinstance(entry, plateau):
            if monitor is None:
                raise MisconfigurationError(
                    "A ReduceLROnPlateau scheduler needs a monitored metric: return "
                    "{'optimizer': ..., 'lr_scheduler': scheduler, 'monitor': 'metric_name'}.")
            return LRSchedulerConfig(entry, reduce_on_plateau=True, monitor=monitor)
        return LRSchedulerConfig(entry)
    unknown = set(entry) - _SCHEDULER_KEYS
    if unknown:
        warnings.warn(f"configure_optimizers(): ignoring unknown keys {sorted(unknown)} of an lr_scheduler dict.",
                      RuntimeWarning, stacklevel=3)
        entry = {k: v for k, v in entry.items() if k in _SCHEDULER_KEYS}
    if "scheduler" not in entry:
        raise MisconfigurationError("An lr_scheduler dict needs a 'scheduler' key with the scheduler.")
    if entry.get("interval", "epoch") not in ("step", "epoch"):
        raise MisconfigurationError(f"lr_scheduler interval={entry['interval']!r}: use 'step' or 'epoch'.")
    entry = {"reduce_on_plateau": isinstance(entry["scheduler"], plateau), **entry}
    if entry["reduce_on_plateau"] and entry.get("monitor") is None:
        raise MisconfigurationError(
            "A ReduceLROnPlateau scheduler needs a monitored metric: "
            "{'scheduler': scheduler, 'monitor': 'metric_name'} in the lr_scheduler dict.")
    if isinstance(entry["scheduler"], torch.optim.lr_scheduler.OneCycleLR) and entry.get("interval", "epoch") == "epoch":
        warnings.warn("A OneCycleLR scheduler steps once per epoch here ('interval': 'epoch'); it is usually "
                      "meant to step every batch ('interval': 'step').", RuntimeWarning, stacklevel=3)
    return LRSchedulerConfig(**entry)


_MANUAL_IGNORED = ("reduce_on_plateau", "monitor", "strict")


def _manual_scheduler_config(entry: Any) -> LRSchedulerConfig:
    """In manual optimization the user steps the schedulers; ``interval`` and ``frequency`` are kept
    only as a record (an LR monitor reads them)."""
    if not isinstance(entry, dict):
        return LRSchedulerConfig(entry)
    ignored = [k for k in entry if k in _MANUAL_IGNORED]
    if ignored:
        warnings.warn(f"The lr_scheduler dict sets {ignored}, which manual optimization ignores: call "
                      "`scheduler.step(...)` yourself.", RuntimeWarning, stacklevel=3)
    return LRSchedulerConfig(**{k: v for k, v in entry.items() if k not in _MANUAL_IGNORED})


def step_schedulers(configs: list[LRSchedulerConfig], interval: str, count: int,
                    read_metrics: Callable[[], Mapping[str, Tensor]]) -> None:
    """Step the schedulers of ``interval`` whose ``frequency`` divides ``count``.

    ``count`` is the global step for "step" schedulers and the number of finished epochs
    for "epoch" ones; a ``reduce_on_plateau`` scheduler reads its monitored value from
    ``read_metrics()``, called only then (reading the metrics is not free on every step).
    """
    for config in configs:
        if config.interval != interval or count % config.frequency:
            continue
        if not config.reduce_on_plateau:
            config.scheduler.step()
            continue
        metrics = read_metrics()
        monitor = config.monitor or ""
        if monitor in metrics:
            config.scheduler.step(float(metrics[monitor]))
        elif config.strict:
            raise MisconfigurationError(
                f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; logged: "
                f"{sorted(metrics)}. Set 'monitor' in the lr_scheduler dict (or 'strict': False to skip).")
        else:
            warnings.warn(f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; its step is skipped "
                          "('strict': False).", RuntimeWarning, stacklevel=2)


class NoOptimizer(Optimizer):
    """Stands in when ``configure_optimizers`` returns ``None``: stepping it only runs the closure."""

    def __init__(self) -> None:
        super().__init__([torch.zeros(1)], {})

    def add_param_group(self, param_group: dict[Any, Any]) -> None:
        """Holds no parameters to update: the placeholder group is not kept."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradients to clear."""

    def __repr__(self) -> str:
        return "NoOptimizer()"


StepFn = Callable[..., Any]  # (optimizer, closure, **kwargs) -> what the step returns
ToggleFn = Callable[[Any, bool], ContextManager]  # (optimizer, sync_grad) -> toggled context


def _no_closure() -> None:
    return None


class LoopOptimizer:
    """Lightning's ``LightningOptimizer``: what ``LoopModule.optimizers()`` returns.

    ``step`` runs through ``step_fn`` so that it goes through the strategy's precision (a grad
    scaler under "16-mixed"), the ``on_before_optimizer_step`` hook and the global-step count;
    the Strategy builds the wrappers (stepping through its precision only), and the
    manual-optimization loop gives them its own ``step_fn`` when a run starts. Everything else is the wrapped optimizer's; ``isinstance`` checks
    against its class hold, as in Lightning.
    """

    def __init__(self, optimizer: Optimizer, step_fn: StepFn, toggle_fn: ToggleFn | None = None) -> None:
        self._optimizer = optimizer
        self.step_fn = step_fn
        self._toggle_fn = toggle_fn
        self.__class__ = _imitating(type(optimizer))

    @property
    def optimizer(self) -> Optimizer:
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._optimizer.param_groups

    @property
    def state(self) -> Any:
        return self._optimizer.state

    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        """One update; ``closure`` (if given) recomputes the loss and calls ``manual_backward``."""
        if closure is None:
            closure = _no_closure
        elif not callable(closure):
            raise MisconfigurationError("optimizer.step(closure): the closure must be callable.")
        return self.step_fn(self._optimizer, closure, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._optimizer.add_param_group(param_group)

    def toggle_model(self, sync_grad: bool = True) -> ContextManager:
        """A context where only this optimizer's parameters require grad (``LoopModule.toggle_optimizer``);
        with ``sync_grad=False`` backward skips the gradient sync across ranks (while accumulating)."""
        if self._toggle_fn is None:
            raise RuntimeError("This LoopOptimizer is not attached to a Trainer's strategy.")
        return self._toggle_fn(self, sync_grad)

    def __getattr__(self, name: str) -> Any:
        if name == "_optimizer":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def __getstate__(self) -> dict[str, Any]:  # the wrapper's own, not the optimizer class's
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"LoopOptimizer({self._optimizer!r})"


@functools.cache
def _imitating(optimizer_class: type) -> type:
    """A subclass of both ``LoopOptimizer`` and ``optimizer_class``, once per optimizer class."""
    return type("Loop" + optimizer_class.__name__, (LoopOptimizer, optimizer_class), {})


def optimizer_state_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's form) keyed by index instead, as
    ``Optimizer.state_dict`` keys it; ``names`` are the parameter names in the optimizer's order."""
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_state_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of ``optimizer_state_by_index``."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}
