"""ModelSummary: Lightning's table of the module's layers, their parameters and modes, at the start of fit."""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.utils.flop_counter import FlopCounterMode

from distloop.callbacks.callback import Callback
from distloop.errors import MisconfigurationError

UNITS = [" ", "K", "M", "B", "T"]
UNKNOWN_SIZE = "?"
NOT_APPLICABLE = "n/a"
LEFTOVER_PARAMS_NAME = "other params"
# Bits per parameter for the size estimate; any other precision (the mixed ones) counts 32, as in Lightning.
PRECISION_BITS = {"64": 64, "32": 32, "16": 16, "bf16": 16, "16-true": 16, "bf16-true": 16, "32-true": 32,
                  "64-true": 64}


@dataclass
class Summary:
    """What ``summarize`` found; ``str(summary)`` is Lightning's table."""

    columns: list[tuple[str, list[str]]]
    total_parameters: int
    trainable_parameters: int
    model_size: float  # MB
    training_modes: dict[str, int]  # modules (below the root) in train / eval mode
    total_flops: int = 0
    layers: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return format_table(self)


class ModelSummary(Callback):
    """Prints the summary on global rank zero when ``fit`` starts; ``max_depth`` is how deep
    the table goes into nested modules (-1: all of them; 0: no summary); ``summarize_kwargs``
    go to ``summarize`` (as Lightning's, for a subclass's own options)."""

    may_set_should_stop = False

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        _check_depth(max_depth)
        self._max_depth = max_depth
        self._summarize_kwargs = summarize_kwargs

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        found = summarize(module, self._max_depth, _precision(trainer))
        self.summarize(found.columns, found.total_parameters, found.trainable_parameters, found.model_size,
                       found.training_modes, found.total_flops, **self._summarize_kwargs)

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        """Prints the summary: Lightning's override point, for a subclass that shows it its own way."""
        summary = Summary(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                          total_flops)
        print(format_table(summary), file=sys.stderr, flush=True)


def summarize(module: nn.Module, max_depth: int = 1, precision: str = "32") -> Summary:
    """The summary of ``module`` down to ``max_depth``, with input and output sizes and FLOPs
    when the module has an ``example_input_array`` (one forward pass in eval mode)."""
    _check_depth(max_depth)
    layers = _layers(module, max_depth)
    flops = FlopCounterMode(display=False, depth=max_depth + 1)
    sizes = _example_sizes(module, dict(layers), flops)
    counts = flops.get_flop_counts()
    root = type(module).__name__
    names = [name for name, _ in layers]
    columns = [
        (" ", [str(i) for i in range(len(layers))]),
        ("Name", names),
        ("Type", [type(m).__name__ for _, m in layers]),
        ("Params", [human_count(_count(m.parameters())) for _, m in layers]),
        ("Mode", ["train" if m.training else "eval" for _, m in layers]),
        ("FLOPs", [human_count(sum(counts.get(f"{root}.{name}", {}).values())) for name in names]),
    ]
    if sizes is not None:
        columns.append(("In sizes", [str(sizes.get(name, (UNKNOWN_SIZE,) * 2)[0]) for name in names]))
        columns.append(("Out sizes", [str(sizes.get(name, (UNKNOWN_SIZE,) * 2)[1]) for name in names]))
    total = _count(module.parameters())
    leftover = total - sum(_count(m.parameters()) for _, m in layers)
    if leftover > 0:
        _add_leftover(columns, leftover)
    modes = [m.training for m in module.modules()][1:]
    bits = PRECISION_BITS.get(precision)
    if bits is None:
        warnings.warn(f"Precision {precision} is not supported by the model summary.  Estimated model size in MB "
                      "will not be accurate. Using 32 bits instead.", stacklevel=2)
        bits = 32
    return Summary(columns=columns, total_parameters=total,
                   trainable_parameters=_count(p for p in module.parameters() if p.requires_grad),
                   model_size=total * bits / 8 * 1e-6,
                   training_modes={"train": modes.count(True), "eval": modes.count(False)},
                   total_flops=flops.get_total_flops(), layers=names)


def format_table(summary: Summary) -> str:
    """Lightning's layout: a header, a row per layer, then the totals, each number in a 10-wide column."""
    columns = summary.columns
    rows = len(columns[0][1])
    widths = [max([len(title), *(len(v) for v in values)]) for title, values in columns]
    rule = "-" * (sum(widths) + 3 * (len(columns) + 1))
    lines = [" | ".join(f"{title:<{w}}" for (title, _), w in zip(columns, widths)), rule]
    lines += [" | ".join(f"{values[i]:<{w}}" for (_, values), w in zip(columns, widths)) for i in range(rows)]
    lines.append(rule)
    totals = [
        (human_count(summary.trainable_parameters), "Trainable params"),
        (human_count(summary.total_parameters - summary.trainable_parameters), "Non-trainable params"),
        (human_count(summary.total_parameters), "Total params"),
        (f"{summary.model_size:,.3f}", "Total estimated model params size (MB)"),
        (str(summary.training_modes["train"]), "Modules in train mode"),
        (str(summary.training_modes["eval"]), "Modules in eval mode"),
        (human_count(summary.total_flops), "Total Flops"),
    ]
    lines += [f"{value:<10}{label}" for value, label in totals]
    return "\n".join(lines)


def human_count(number: float) -> str:
    """``123`` -> ``"123  "``, ``1234`` -> ``"1.2 K"``, ``2e6`` -> ``"2.0 M"``; never beyond T."""
    assert number >= 0
    digits = int(math.floor(math.log10(number)) + 1 if number > 0 else 1)
    groups = min(int(math.ceil(digits / 3)), len(UNITS))
    scaled = number * 10 ** (-3 * (groups - 1))
    if groups == 1 or scaled >= 100:
        return f"{int(scaled):,d} {UNITS[groups - 1]}"
    return f"{scaled:,.1f} {UNITS[groups - 1]}"


def _check_depth(max_depth: int) -> None:
    if not isinstance(max_depth, int) or max_depth < -1:
        raise MisconfigurationError(f"ModelSummary(max_depth={max_depth!r}): use -1 (all), 0 (none) or a depth > 0.")


def _layers(module: nn.Module, max_depth: int) -> list[tuple[str, nn.Module]]:
    if max_depth == 0:
        return []
    if max_depth == 1:
        return list(module.named_children())
    named = list(module.named_modules())[1:]  # not the root
    return named if max_depth == -1 else [(n, m) for n, m in named if n.count(".") < max_depth]


def _count(parameters: Any) -> int:
    total = 0
    for p in parameters:
        if isinstance(p, UninitializedParameter):
            warnings.warn("The total number of parameters detected may be inaccurate because the model contains an "
                          "instance of `UninitializedParameter`. To get an accurate number, set "
                          "`self.example_input_array` in your LightningModule.", stacklevel=3)
            continue
        total += p.numel()
    return total


def _add_leftover(columns: list[tuple[str, list[str]]], leftover: int) -> None:
    """A row for parameters that belong to no listed layer (set on the module itself)."""
    extra = {" ": " ", "Name": LEFTOVER_PARAMS_NAME, "Params": human_count(leftover)}
    for title, values in columns:
        values.append(extra.get(title, NOT_APPLICABLE))


def _example_sizes(module: nn.Module, layers: dict[str, nn.Module],
                   flops: FlopCounterMode) -> dict[str, tuple[Any, Any]] | None:
    """Each layer's (input, output) sizes from one forward pass of ``example_input_array``, counting FLOPs."""
    example = getattr(module, "example_input_array", None)
    if example is None:
        return None
    sizes: dict[str, tuple[Any, Any]] = {}

    def recorder(name: str) -> Any:
        def hook(_: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            inputs = (*args, *kwargs.values())
            sizes.setdefault(name, (_shape(inputs[0] if len(inputs) == 1 else inputs), _shape(out)))
        return hook

    handles = [m.register_forward_hook(recorder(n), with_kwargs=True) for n, m in layers.items()
               if not isinstance(m, torch.jit.ScriptModule)]
    modes = {m: m.training for m in module.modules()}
    example = _to_device(example, next((p.device for p in module.parameters()), torch.device("cpu")))
    module.eval()
    try:
        with torch.no_grad(), flops:
            if isinstance(example, (list, tuple)):
                module(*example)
            elif isinstance(example, dict):
                module(**example)
            else:
                module(example)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return sizes


def _shape(value: Any) -> Any:
    if hasattr(value, "shape"):
        return list(value.shape)
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    return UNKNOWN_SIZE


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _precision(trainer: Any) -> str:
    precision = getattr(trainer, "precision", None)
    if precision is None:
        precision = getattr(getattr(trainer.strategy, "precision", None), "precision", "32")
    return str(precision)
