"""LearningRateMonitor: each optimizer's learning rate (and momentum, weight decay) sent to the loggers.

Lightning's names: ``lr-<OptimizerClass>`` (or the scheduler config's ``name``), ``-1``,
``-2`` ... for further optimizers of the same class, ``/pg<N>`` (or the group's ``name``)
when an optimizer has several param groups, ``-momentum`` / ``-weight_decay`` after them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.optim import Optimizer

from distloop.callbacks.callback import Callback
from distloop.errors import MisconfigurationError
from distloop.rank_zero import rank_zero_warn


class LearningRateMonitor(Callback):
    """Logs learning rates at the start of training steps and epochs.

    ``logging_interval="step"`` or ``"epoch"`` logs every optimizer then; ``None`` follows each
    scheduler's own ``interval`` (optimizers without a scheduler at both). Step
    values go out at the steps the Trainer logs at (every ``log_every_n_steps``), at the step
    the run has reached, and also land in ``trainer.callback_metrics``.
    """

    may_set_should_stop = False

    def __init__(self, logging_interval: str | None = None, log_momentum: bool = False,
                 log_weight_decay: bool = False, log_key_prefix: str | None = None) -> None:
        if logging_interval not in (None, "step", "epoch"):
            raise MisconfigurationError("LearningRateMonitor(logging_interval=...) should be 'step', 'epoch' or None, "
                                        f"not {logging_interval!r}.")
        self.logging_interval = logging_interval
        self.log_momentum = log_momentum
        self.log_weight_decay = log_weight_decay
        self.log_key_prefix = log_key_prefix or ""
        self.lrs: dict[str, list[float]] = {}  # every learning rate logged, by name

    def on_train_start(self, trainer: Any, module: Any) -> None:
        if not trainer.loggers:
            raise MisconfigurationError("Cannot use `LearningRateMonitor` callback with `Trainer` that has no logger.")
        if self.log_momentum and not all({"momentum", "betas"} & set(o.defaults) for o in _optimizers(trainer)):
            rank_zero_warn("You have set log_momentum=True, but some optimizers do not have momentum. This will log "
                           "a value 0 for the momentum.")
        self.lrs = {name: [] for names, _ in self._named(trainer) for name in names}

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if self.logging_interval == "epoch" or not _logs_this_step(trainer):
            return
        self._log(trainer, "step" if self.logging_interval is None else "any")

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        if self.logging_interval != "step":
            self._log(trainer, "epoch" if self.logging_interval is None else "any")

    def _log(self, trainer: Any, interval: str) -> None:
        stats: dict[str, float] = {}
        for names, (optimizer, config_interval) in self._named(trainer):
            if config_interval is not None and interval not in (config_interval, "any"):
                continue
            stats.update(self._stats(optimizer, names))
        if not stats:
            return
        device = trainer.strategy.root_device
        trainer.callback_metrics.update({k: torch.tensor(float(v), device=device) for k, v in stats.items()})
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(stats, step=trainer.global_step)

    def _stats(self, optimizer: Optimizer, names: list[str]) -> dict[str, float]:
        stats = {}
        betas = "betas" in optimizer.defaults
        for group, name in zip(optimizer.param_groups, names):
            stats[name] = group["lr"]
            if name.endswith("/pg1") and name[:-4] in self.lrs:  # a second group was added: the first is /pg1 now
                self.lrs[name] = self.lrs.pop(name[:-4])
            self.lrs.setdefault(name, []).append(group["lr"])
            if self.log_momentum:
                stats[f"{name}-momentum"] = group["betas"][0] if betas else group.get("momentum", 0)
            if self.log_weight_decay:
                stats[f"{name}-weight_decay"] = group["weight_decay"]
        return stats

    def _named(self, trainer: Any) -> list[tuple[list[str], tuple[Optimizer, str | None]]]:
        """Each optimizer's group names and its scheduler's interval (``None``: no scheduler);
        optimizers with a scheduler first, in the schedulers' order, as Lightning names them."""
        seen_types: defaultdict[type, int] = defaultdict(int)
        named = []
        with_scheduler = []
        for config in trainer.lr_scheduler_configs:
            optimizer = config.scheduler.optimizer
            with_scheduler.append(optimizer)
            name = config.name if config.name is not None else f"lr-{type(optimizer).__name__}"
            named.append((self._group_names(optimizer, name, seen_types, count=config.name is None),
                          (optimizer, config.interval)))
        for optimizer in _optimizers(trainer):
            if any(optimizer is o for o in with_scheduler):
                continue
            named.append((self._group_names(optimizer, f"lr-{type(optimizer).__name__}", seen_types, count=True),
                          (optimizer, None)))
        return named

    def _group_names(self, optimizer: Optimizer, name: str, seen_types: defaultdict[type, int],
                     count: bool) -> list[str]:
        if count:
            seen_types[type(optimizer)] += 1
            if seen_types[type(optimizer)] > 1:
                name = f"{name}-{seen_types[type(optimizer)] - 1}"
        groups = optimizer.param_groups
        labels = [g.get("name", f"pg{i}") for i, g in enumerate(groups, start=1)]
        duplicated = {label for label in labels if labels.count(label) > 1}
        if duplicated:
            raise MisconfigurationError("A single `Optimizer` cannot have multiple parameter groups with identical "
                                        f"`name` values. {name} has duplicated parameter group names {duplicated}")
        if len(groups) == 1:
            names = [f"{name}/{groups[0]['name']}" if groups[0].get("name") else name]
        else:
            names = [f"{name}/{label}" for label in labels]
        return [f"{self.log_key_prefix}{n}" for n in names]


def _optimizers(trainer: Any) -> list[Optimizer]:
    return [getattr(o, "optimizer", o) for o in trainer.optimizers]  # a wrapper's inner optimizer


def _logs_this_step(trainer: Any) -> bool:
    """Whether the step about to run is one the Trainer logs at (Lightning's ``should_update_logs``)."""
    n = trainer.log_every_n_steps
    completed = trainer.fit_loop.epoch_loop.batch_progress.total.completed
    return n > 0 and ((completed + 1) % n == 0 or trainer.should_stop)
