"""Per-step overhead of distloop's ``Trainer.fit`` over a hand-written PyTorch loop.

    python benchmarks/overhead.py [--steps 3000] [--reps 7]

Both loops train ``nn.Linear(32, 32)`` (MSE, SGD, one thread) from the same initial
weights on the same pre-batched in-memory data: a list of ``(x, y)`` tuples, so loading
a batch costs the same in both. Runs are interleaved (A, B, A, B, ...) after a warm-up.
Timed: the hand-written loop from building its optimizer to reading its epoch means;
``trainer.fit(...)`` as a whole (the ``Trainer`` is built before the clock starts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distloop
from _common import LR, Bench, code_version, cpu_model, loop_only, metric_scales, metric_values

BATCH, DIM, SEED = 32, 32, 0
CASES = {"no logging": 0, "8 metrics": 8}  # case -> metrics logged per step
BARS_US = {"no logging": 20.0, "8 metrics": 40.0}  # max overhead per step

Batches = list[tuple[Tensor, Tensor]]


def make_data(steps: int) -> Batches:
    """``steps`` batches of random regression data, from a fixed seed."""
    g = torch.Generator().manual_seed(SEED)
    return [(torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)) for _ in range(steps)]


def fresh_layer() -> nn.Linear:
    """The same initial weights for every run."""
    torch.manual_seed(SEED)
    return nn.Linear(DIM, DIM)


def hand_written(layer: nn.Linear, data: Batches, n_metrics: int) -> float:
    """Train one epoch by hand, keeping the same running means as ``self.log``; returns seconds."""
    gc.collect()
    t0 = time.perf_counter()
    optimizer = torch.optim.SGD(layer.parameters(), lr=LR)
    sums = [torch.zeros(()) for _ in range(n_metrics)]
    scales = metric_scales(n_metrics)
    count = 0
    for x, y in data:
        loss = F.mse_loss(layer(x), y)
        batch_size = x.shape[0]
        if sums:
            for s, value in zip(sums, metric_values(loss, scales)):
                s.add_(value, alpha=batch_size)
        count += batch_size
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if sums:
        torch.stack(sums).div(count).tolist()  # the epoch means, on the host
    return time.perf_counter() - t0


def with_distloop(layer: nn.Linear, data: Batches, n_metrics: int) -> float:
    """Train one epoch with ``Trainer.fit``; returns seconds."""
    module = Bench(layer, n_metrics)
    trainer = distloop.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
                               num_sanity_val_steps=0, accelerator="cpu", **loop_only())
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - t0




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="training steps per measurement")
    parser.add_argument("--reps", type=int, default=7, help="measurements per loop and case")
    args = parser.parse_args()
    version = code_version()  # before the run: the code imported is the code measured
    torch.set_num_threads(1)
    data = make_data(args.steps)
    loops = {"hand-written": hand_written, "distloop": with_distloop}

    for case, n_metrics in CASES.items():  # warm-up, and a check that both loops do the same work
        layers = {name: fresh_layer() for name in loops}
        for name, loop in loops.items():
            loop(layers[name], data, n_metrics)
        assert torch.equal(layers["hand-written"].weight, layers["distloop"].weight), case

    us_per_step: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.reps):
        for case, n_metrics in CASES.items():
            for name, loop in loops.items():
                seconds = loop(fresh_layer(), data, n_metrics)
                us_per_step.setdefault((case, name), []).append(seconds / args.steps * 1e6)

    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"distloop overhead benchmark, {now}")
    print(f"machine: {platform.platform()}, {cpu_model()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min, this run included)")
    print(f"code:    {version}")
    print(f"run:     {args.steps} steps of nn.Linear({DIM}, {DIM}), batch {BATCH}, SGD, MSE; "
          f"median of {args.reps} interleaved runs after a warm-up")
    print("timed:   hand-written = optimizer + loop + epoch means; distloop = trainer.fit() as a whole "
          "(Trainer built before)\n")
    print(f"{'case':<12}{'hand-written us/step':>22}{'distloop us/step':>18}{'overhead us/step':>18}"
          f"{'ratio':>8}   bar")
    for case in CASES:
        hand = statistics.median(us_per_step[case, "hand-written"])
        ours = statistics.median(us_per_step[case, "distloop"])
        overhead, bar = ours - hand, BARS_US[case]
        verdict = "PASS" if overhead <= bar else "FAIL"
        print(f"{case:<12}{hand:>22.1f}{ours:>18.1f}{overhead:>18.1f}{ours / hand:>8.2f}   "
              f"<= {bar:.0f} {verdict}")


if __name__ == "__main__":
    main()
