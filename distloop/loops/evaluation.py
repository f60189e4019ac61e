"""Evaluation loop: one pass over the validation or test dataloaders, without gradients."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from distloop.loops.fetcher import BatchIterator, next_batch
from distloop.loops.loop import Loop
from distloop.module import LoopModule, overrides, takes_argument
from distloop.progress import BatchProgress
from distloop.results import ResultCollection
from distloop.stages import RunningStage

_SUFFIX = "/dataloader_idx_"


def is_loader_sequence(source: Any) -> bool:
    """Whether ``source`` is a list of loaders rather than one loader that is a list of batches:
    its items are iterables (a DataLoader, a list of batches), not batches (tensors, tuples, dicts)."""
    return isinstance(source, (list, tuple)) and bool(source) and all(
        isinstance(item, Iterable) and not isinstance(item, (torch.Tensor, tuple, Mapping, str)) for item in source)


def loader_list(source: Any) -> tuple[list[Iterable], bool]:
    """A loader, or a list / tuple / dict of them (Lightning's "sequential" mode), as a list; and
    whether it was a single one. ``None`` gives no loaders; a list of batches is one loader."""
    if source is None:
        return [], True
    if isinstance(source, Mapping):
        return list(source.values()), False
    if is_loader_sequence(source):
        return list(source), False
    return [source], True


def as_dataloader_list(dataloaders: Any, max_batches: Any) -> tuple[list[Iterable], list[float]]:
    """One loader and its batch count, or a list of each (what ``trainer.num_val_batches`` holds)."""
    loaders, _ = loader_list(dataloaders)
    if isinstance(max_batches, Sequence):
        limits = [float(n) for n in max_batches]
    else:
        limits = [float(max_batches)] * len(loaders)
    if len(limits) != len(loaders):
        raise ValueError(f"{len(loaders)} dataloaders but {len(limits)} batch limits.")
    return loaders, limits


class EvaluationLoop(Loop):
    """Runs ``validation_step`` (``stage="validate"``) or ``test_step`` (``stage="test"``) per batch,
    dataloader after dataloader (Lightning's "sequential" mode), with the epoch hooks once around all.

    ``run(dataloaders, max_batches)`` takes one loader or a list (with one limit or a list) and
    returns one dict of logged epoch metrics per dataloader. With several dataloaders, the step
    and batch hooks get ``dataloader_idx`` and logged names take the ``/dataloader_idx_N`` suffix.
    """

    def __init__(self, stage: str = "validate") -> None:
        super().__init__()
        self.stage = stage
        prefix = "validation" if stage == "validate" else stage  # Lightning's hook names
        self._step_name = f"{prefix}_step"
        self._hook_names = {part: f"on_{prefix}_{part}"
                            for part in ("start", "epoch_start", "batch_start", "batch_end", "epoch_end", "end")}
        self.batch_progress = BatchProgress()
        self.results = ResultCollection(training=False)
        self.dataloader_idx = 0
        self._loaders: list[Iterable] = []
        self._limits: list[float] = []
        self._batches: BatchIterator | None = None
        self._padding = 0  # steps to run after this rank's last batch (see run_padding_steps)
        self._step_fn: Any = None
        self._pass_batch_idx = True
        self._was_training = False
        self._outer_results: ResultCollection | None = None
        self._outer_stage: RunningStage | None = None

    @property
    def num_dataloaders(self) -> int:
        return len(self._loaders)

    @property
    def done(self) -> bool:
        return self.batch_progress.is_last_batch and self.dataloader_idx >= len(self._loaders) - 1

    def reset(self) -> None:
        self.batch_progress.reset_on_run()
        self.results.clear()
        self.dataloader_idx = 0

    def on_run_start(self, dataloaders: Any, max_batches: Any = math.inf) -> None:
        trainer, module = self.trainer, self.trainer.module
        self._loaders, self._limits = as_dataloader_list(dataloaders, max_batches)
        self._outer_stage = trainer.state.stage
        if trainer.state.stage != RunningStage.SANITY_CHECKING:
            trainer.state.stage = RunningStage.VALIDATING if self.stage == "validate" else RunningStage.TESTING
        self._was_training = module.training
        module.eval()
        self._outer_results, module.log_context.results = module.log_context.results, self.results
        self.results.device = trainer.strategy.root_device
        self.results.sync_fn = trainer.metrics_sync_fn
        self._step_fn = getattr(module, self._step_name)
        self._pass_batch_idx = takes_argument(self._step_fn, "batch_idx", 1)
        self._check_dataloader_idx(module)
        self._start_dataloader(0)
        trainer.hooks(self._hook_names["start"])
        trainer.hooks(self._hook_names["epoch_start"])

    def _check_dataloader_idx(self, module: Any) -> None:
        check_dataloader_idx(module, self.stage, len(self._loaders),
                             (self._step_name, self._hook_names["batch_start"], self._hook_names["batch_end"]))

    def _start_dataloader(self, idx: int) -> None:
        self.dataloader_idx = idx
        self.batch_progress.current.reset()
        self.batch_progress.is_last_batch = self._limits[idx] == 0
        self._batches = BatchIterator(self._loaders[idx], self._limits[idx])
        self._padding = self.trainer.strategy.evaluation_steps_to_pad(self._batches.count)
        self.trainer.module.log_context.dataloader_idx = idx if len(self._loaders) > 1 else None

    def advance(self, dataloaders: Any, max_batches: Any = math.inf) -> None:
        assert self._batches is not None
        trainer, module, progress = self.trainer, self.trainer.module, self.batch_progress
        while progress.is_last_batch and self.dataloader_idx < len(self._loaders) - 1:
            self._start_dataloader(self.dataloader_idx + 1)
        if progress.is_last_batch:  # every remaining dataloader was empty
            raise StopIteration
        batch, batch_idx = next_batch(self._batches, progress, trainer.strategy)
        extra = (self.dataloader_idx,) if len(self._loaders) > 1 else ()
        module.log_context.batch, module.log_context.batch_size = batch, None
        trainer.hooks(self._hook_names["batch_start"], batch, batch_idx, *extra)
        progress.increment_started()
        module.log_context.fx = self._step_name
        args = (batch, batch_idx, *extra) if self._pass_batch_idx else (batch, *extra)
        try:
            with trainer.strategy.evaluation_context(trainer.inference_mode), trainer.strategy.autocast():
                outputs = self._step_fn(*args)
            if progress.is_last_batch:
                run_padding_steps(trainer, self._step_fn, args, self._padding)
        finally:
            module.log_context.fx = None
        progress.increment_processed()
        trainer.hooks(self._hook_names["batch_end"], outputs, batch, batch_idx, *extra)
        progress.increment_completed()

    def on_run_end(self) -> list[dict[str, float]]:
        trainer, module = self.trainer, self.trainer.module
        module.log_context.dataloader_idx = None
        trainer.epoch_end_reached(self.results)
        trainer.hooks.callbacks(self._hook_names["epoch_end"], monitoring=False)  # Lightning's order, then one read
        trainer.hooks.module(self._hook_names["epoch_end"])
        if trainer.sanity_checking:
            metrics: dict[str, float] = {}
            trainer.epoch_end_reached(None)
        else:
            metrics = trainer.read_metrics(self.results, on_step=False)
        trainer.hooks.callbacks(self._hook_names["epoch_end"], monitoring=True)
        trainer.hooks(self._hook_names["end"])
        module.log_context.results = self._outer_results
        trainer.state.stage = self._outer_stage
        if self._was_training:
            module.train()
        return split_by_dataloader(metrics, len(self._loaders))


def run_padding_steps(trainer: Any, step_fn: Any, args: tuple, count: int) -> None:
    """Run ``step_fn(*args)`` (this rank's last batch) ``count`` more times, with what it logs
    and returns dropped and no hook called: so that this rank takes part in the collectives of
    the steps other ranks still run (``Strategy.evaluation_steps_to_pad``)."""
    if count <= 0:
        return
    context = trainer.module.log_context
    kept, context.results = context.results, ResultCollection(training=False, device=trainer.strategy.root_device)
    try:
        for _ in range(count):
            with trainer.strategy.evaluation_context(trainer.inference_mode), trainer.strategy.autocast():
                step_fn(*args)
    finally:
        context.results = kept


def check_dataloader_idx(module: Any, stage: str, count: int, hooks: Sequence[str]) -> None:
    """Lightning's rule: several dataloaders need ``dataloader_idx`` in the step and batch hooks."""
    if count < 2:
        return
    for name in hooks:
        if overrides(module, LoopModule, name) and not takes_argument(getattr(module, name), "dataloader_idx", 99):
            raise RuntimeError(
                f"You passed {count} {stage} dataloaders, but `{type(module).__name__}.{name}()` "
                "has no `dataloader_idx` argument: add `dataloader_idx=0` to its signature.")


def split_by_dataloader(metrics: dict[str, float], count: int) -> list[dict[str, float]]:
    """Per dataloader: its suffixed metrics and those logged without a suffix (Lightning's result lists)."""
    if count <= 1:
        return [dict(metrics)]
    return [{k: v for k, v in metrics.items() if _SUFFIX not in k or k.endswith(f"{_SUFFIX}{i}")}
            for i in range(count)]


def results_table(stage: str, results: list[dict[str, float]]) -> str:
    """What Lightning prints after validate / test: one row per metric, one column per dataloader."""
    names = sorted({k.split("/dataloader_idx_")[0] for r in results for k in r})
    if not names:
        return ""
    title = f"{'Validate' if stage == 'validate' else stage.capitalize()} metric"
    columns = [f"DataLoader {i}" for i in range(len(results))]
    rows = []
    for name in names:
        cells = []
        for i, r in enumerate(results):
            value = r.get(name, r.get(f"{name}/dataloader_idx_{i}"))
            cells.append("" if value is None else f"{value:.6g}")
        rows.append([name, *cells])
    widths = [max(len(str(c)) for c in col) for col in zip([title, *columns], *rows)]
    line = "─" * (sum(widths) + 3 * len(widths) + 1)
    fmt = "│ " + " │ ".join(f"{{:<{w}}}" for w in widths) + " │"
    return "\n".join([line, fmt.format(title, *columns), line, *(fmt.format(*r) for r in rows), line])
