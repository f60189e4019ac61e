"""Pictures of runs: the curves of one or several ``metrics.csv`` files in one PNG.

A run's ``metrics.csv`` (see ``distloop.loggers.CSVLogger``) has a row per logging event and
a column per metric, most cells empty. Each metric becomes a series of (step, value); series
of one family (``train_loss_step``, ``val_loss`` and ``test_loss`` are all ``loss``) share a
subplot, so train and validation can be compared at a glance. Values logged once per epoch
are drawn at the step they were logged at, so every series shares one x axis.

Only matplotlib is needed (``pip install 'distloop[matplotlib]'``), not torch: runs can be
plotted on a laptop from copied files.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from distloop.errors import MisconfigurationError
from distloop.extras import require

METRICS_FILE = "metrics.csv"
_STAGE = re.compile(r"^(train|val|valid|validation|test)[_/]")
# A stage looks the same in every subplot: colour (one run) and line style (several runs).
_COLOUR = {"train": "C0", "val": "C1", "valid": "C1", "validation": "C1", "test": "C2"}
_STYLE = {"val": "--", "valid": "--", "validation": "--", "test": ":"}
_INTERVAL = re.compile(r"[_/](step|epoch)$")


@dataclass
class Series:
    """One metric: its values and the steps they were logged at."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One ``metrics.csv``: ``name`` labels it in a legend, ``series`` maps a column to its values."""

    name: str
    path: str
    series: dict[str, Series]


def find_metrics(path: str) -> str:
    """The ``metrics.csv`` that ``path`` names: the file itself, or the one in the directory or
    up to two levels below it (a ``CSVLogger`` with a name and version writes ``name/version_N/``)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise MisconfigurationError(f"{path} is neither a directory nor a {METRICS_FILE} file.")
    for pattern in (METRICS_FILE, f"*/{METRICS_FILE}", f"*/*/{METRICS_FILE}"):
        found = sorted(str(p) for p in Path(path).glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if found:
            raise MisconfigurationError(f"{path} holds several {METRICS_FILE} files ({', '.join(found)}): "
                                        "pass the one to plot.")
    raise MisconfigurationError(f"{path} holds no {METRICS_FILE} (was the run logged with logger=csv?).")


def read_metrics(path: str) -> Run:
    """The series of a run directory or ``metrics.csv`` (see ``find_metrics``); empty cells are skipped."""
    file = find_metrics(path)
    series: dict[str, Series] = {}
    with open(file, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row["step"])) if row.get("step") else i
            for key, cell in row.items():
                if key in ("step", "epoch") or key is None or cell in ("", None):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise MisconfigurationError(f"{file}: {key}={cell!r} (row {i + 2}) is not a number.") from None
                one = series.setdefault(key, Series())
                one.steps.append(step)
                one.values.append(value)
    if not series:
        raise MisconfigurationError(f"{file} has no metric values to plot.")
    name = os.path.basename(os.path.abspath(path if os.path.isdir(path) else os.path.dirname(file) or "."))
    return Run(name, file, series)


def family(metric: str) -> str:
    """The subplot a metric goes to: ``train_loss_step``, ``val_loss`` -> ``loss``; every
    learning rate (``lr-AdamW``, ``lr-SGD/pg2``) -> ``lr``; ``lr-SGD-momentum`` -> ``momentum``."""
    if metric.startswith("lr-"):
        return metric.rsplit("-", 1)[1] if metric.endswith(("-momentum", "-weight_decay")) else "lr"
    return _INTERVAL.sub("", _STAGE.sub("", metric)) or metric


def families(runs: list[Run]) -> dict[str, list[str]]:
    """Subplot title -> the metrics drawn in it: ``loss`` first, learning-rate ones last."""
    grouped: dict[str, list[str]] = {}
    for metric in sorted({m for run in runs for m in run.series}):
        grouped.setdefault(family(metric), []).append(metric)
    last = ("lr", "momentum", "weight_decay")
    return dict(sorted(grouped.items(), key=lambda kv: (kv[0] != "loss", kv[0] in last, kv[0])))


def plot_runs(paths: list[str], out: str) -> str:
    """Draw the runs in ``paths`` (run directories or ``metrics.csv`` files) into the PNG ``out``:
    a subplot per metric family; with several runs, one colour per run. Returns ``out``."""
    require("matplotlib", "matplotlib", "Plotting curves")
    from matplotlib.figure import Figure  # no pyplot: no GUI backend and no global state to change

    runs = [read_metrics(p) for p in paths]
    names = [run.name for run in runs]
    if len(set(names)) < len(names):  # e.g. sweep/0 of two sweeps: the paths tell them apart
        for run, path in zip(runs, paths):
            run.name = os.path.normpath(path)
    grouped = families(runs)
    ncols = min(3, len(grouped))
    nrows = -(-len(grouped) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, metrics) in zip(axes, grouped.items()):
        for r, run in enumerate(runs):
            for m, metric in enumerate(metrics):
                if metric not in run.series:
                    continue
                s = run.series[metric]
                stage = match.group(1) if (match := _STAGE.match(metric)) else ""
                colour = _COLOUR.get(stage, f"C{3 + m % 7}") if len(runs) == 1 else f"C{r % 10}"
                label = metric if len(runs) == 1 else f"{run.name}: {metric}"
                if len(s.values) == 1:  # e.g. test_acc: one point, so say its value
                    label += f" = {s.values[0]:.4g}"
                noisy = metric.endswith("_step")  # per-step values: thin, so the epoch means stay visible
                ax.plot(s.steps, s.values, "o" if len(s.values) == 1 else _STYLE.get(stage, "-"), color=colour,
                        label=label, lw=1 if noisy else 1.8, alpha=0.6 if noisy else 1.0)
        ax.set_title(title)
        if title == "loss" and all(v > 0 for run in runs for m in metrics for v in run.series.get(m, Series()).values):
            ax.set_yscale("log")  # a loss falls by decades: on a log axis its late steps are not a flat line
            ax.set_ylabel("log scale")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(grouped):]:
        ax.set_visible(False)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
