"""distloop's DDP on CPU: the collectives it adds per step, and its speed against a hand-written DDP loop.

    python benchmarks/ddp.py [--steps 1000] [--reps 11] [--batch 64] [--dim 256]

Two gloo ranks, spawned here, one thread each. Every rank trains
``Sequential(Linear(dim, dim), ReLU, Linear(dim, dim))`` (MSE, SGD) on its own shard of
pre-batched in-memory data: a list of ``(x, y)`` tuples, which distloop does not re-shard,
so loading a batch costs the same in both loops.

(a) Collectives: every collective of ``torch.distributed`` is wrapped during a fit, and
each outermost call is recorded with the function that asked for it and the sync point it
belongs to (the training step after which it ran, or the epoch end). DDP's gradient
all-reduce runs in its C++ reducer and is not seen; the calls made before training (group
creation, DDP construction) are reported apart, as one-off setup.

(b) Speed: ``trainer.fit`` (the Trainer is built before the clock starts) against a
hand-written loop (process group, DDP construction, optimizer, loop), with the same DDP
options, initial weights and data, run interleaved after a warm-up; the median of
``--reps`` runs. A second hand-written loop computes the 8 values the module logs, and
logs nothing: against it, distloop's ratio is the cost of logging alone, apart from the
module's own arithmetic. On a small shared machine one run's wall time varies by several
percent, so the report adds the main thread's CPU time per step, which varies far less,
and the speed ratio it implies: the hand-written step time plus distloop's extra CPU.

(c) The same runs, timed from each training loop's first batch to its last: what a long
run pays per step, without the one-off set-up and teardown of (b).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import distloop
from _common import (LR, Bench, code_version, cpu_model, loop_only, machine_cpu_seconds, metric_scales, metric_values,
                     own_cpu_seconds)
from distloop.strategies import DDPStrategy
from distloop.strategies.ddp import free_port

WORLD_SIZE, SEED, LOG_EVERY = 2, 0, 50
TIMEOUT_S = 120.0  # every process group's
COUNTED_METRICS = (8, 32)  # (a): the collectives must not grow with the number of metrics
TIMED_CASES = {"8 metrics": 8, "no logging": 0}  # (b): distloop runs, by metrics logged per step
HAND, HAND_VALUES, LOGGED = "hand-written", "hand-written + 8 values", "distloop, 8 metrics"
MAX_PER_STEP, MAX_PER_SYNC_POINT, MIN_SPEED_RATIO = 0.05, 2, 0.97
# Everything in torch.distributed that talks to other ranks, including DDP's private helpers.
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "broadcast_object_list", "barrier",
    "monitored_barrier", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_gather_coalesced",
    "gather", "gather_object", "scatter", "scatter_object_list", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list", "new_group", "_broadcast_coalesced", "_verify_params_across_processes",
)

Batches = list[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------- model and data
def make_data(rank: int, steps: int, batch: int, dim: int) -> Batches:
    """This rank's shard: ``steps`` batches of random regression data from a per-rank seed."""
    g = torch.Generator().manual_seed(SEED * 1000 + rank)
    return [(torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)) for _ in range(steps)]


def fresh_model(dim: int) -> nn.Sequential:
    """The same initial weights for every run."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


def make_trainer() -> distloop.Trainer:
    return distloop.Trainer(strategy=DDPStrategy(accelerator="cpu", timeout_s=TIMEOUT_S), max_epochs=1,
                            logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                            log_every_n_steps=LOG_EVERY, **loop_only())


# ---------------------------------------------------------------- (a) counting collectives
@dataclass(frozen=True)
class Call:
    where: str  # "setup" (before training), "step N" (after training step N), "epoch end" or "train end"
    caller: str  # the function that asked for it (see ``_caller``)
    name: str  # the torch.distributed function

    @property
    def by_distloop(self) -> bool:
        return self.caller.startswith("distloop.")


class CollectiveCounter:
    """While entered, records every outermost call of a collective (calls made inside one are not counted)."""

    def __init__(self) -> None:
        self.where = "setup"
        self.calls: list[Call] = []
        self._depth = 0
        self._originals: list[tuple[Any, str, Callable]] = []

    def __enter__(self) -> CollectiveCounter:
        for name in COLLECTIVES:
            if not hasattr(dist, name):
                continue
            counted = self._wrap(name, getattr(dist, name))
            for namespace in (dist, c10d):  # c10d: calls between torch.distributed's own functions
                if hasattr(namespace, name):
                    self._originals.append((namespace, name, getattr(namespace, name)))
                    setattr(namespace, name, counted)
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for namespace, name, original in self._originals:
            setattr(namespace, name, original)
        self._originals = []

    def _wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                self.calls.append(Call(self.where, _caller(sys._getframe(1)), name))
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted


def _caller(frame: FrameType | None) -> str:
    """The first function up the stack outside torch.distributed and distloop's strategies, which only relay."""
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("torch.distributed",
                                                                               "distloop.strategies")):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}"


class CountedBench(Bench):
    """``Bench`` that tells the counter which sync point the next collectives belong to.

    Module hooks run before the Trainer reads metrics: ``on_train_batch_end`` before the
    read every ``log_every_n_steps`` batches, ``on_train_epoch_end`` before the epoch-end one.
    """

    def __init__(self, model: nn.Module, n_metrics: int, counter: CollectiveCounter) -> None:
        super().__init__(model, n_metrics, sync_dist=True)
        self.counter = counter

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.counter.where = f"step {self.global_step}"

    def on_train_epoch_end(self) -> None:
        self.counter.where = "epoch end"

    def on_train_end(self) -> None:
        self.counter.where = "train end"


@dataclass
class Counted:
    """The collectives of one counted fit."""

    n_metrics: int
    steps: int
    calls: list[Call]

    @property
    def setup(self) -> list[Call]:
        """Everyone's calls before training: one-off."""
        return [c for c in self.calls if c.where == "setup"]

    @property
    def training(self) -> list[Call]:
        """distloop's calls from the first training step on."""
        return [c for c in self.calls if c.where != "setup" and c.by_distloop]

    @property
    def others(self) -> list[Call]:
        """Anyone else's calls from the first training step on (DDP's Python-level ones, if any)."""
        return [c for c in self.calls if c.where != "setup" and not c.by_distloop]

    @property
    def per_point(self) -> Counter:
        """Sync point -> distloop's calls there."""
        return Counter(c.where for c in self.training)


def count_collectives(n_metrics: int, dim: int, data: Batches) -> Counted:
    """One counted ``trainer.fit``."""
    with CollectiveCounter() as counter:
        make_trainer().fit(CountedBench(fresh_model(dim), n_metrics, counter), data)
    return Counted(n_metrics, len(data), counter.calls)


# ---------------------------------------------------------------- (b) timing
@dataclass(frozen=True)
class Run:
    wall: float  # seconds, the whole fit
    cpu: float  # CPU seconds of the rank's main thread: the loop's own work, not gloo's threads
    loop_wall: float  # the same two for the training loop alone: from the first batch to the last
    loop_cpu: float


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def timed(fn: Callable[[], tuple[tuple[float, float], tuple[float, float]]]) -> Run:
    """Run ``fn`` once every rank is ready; ``fn`` returns the clocks at its loop's start and end."""
    dist.barrier()
    start = _clocks()
    loop_start, loop_end = fn()
    end = _clocks()
    return Run(end[0] - start[0], end[1] - start[1], loop_end[0] - loop_start[0], loop_end[1] - loop_start[1])


def hand_written(model: nn.Module, data: Batches, n_values: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """One epoch of plain DDP, no logging, on a process group of its own, made and destroyed as distloop's fit does.

    ``n_values``: also compute, and drop, the values the benchmark module logs, as it computes them.
    """
    scales = metric_scales(n_values) if n_values else None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ddp = DistributedDataParallel(model, process_group=group, gradient_as_bucket_view=True)  # distloop's options
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loop_start = _clocks()
    for x, y in data:
        loss = F.mse_loss(ddp(x), y)
        if scales is not None:
            metric_values(loss, scales)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loop_end = _clocks()
    del ddp  # it holds the group: free it first, so that destroying the group joins its threads
    dist.destroy_process_group(group)
    return loop_start, loop_end


class ClockedBench(Bench):
    """``Bench`` that reads the clocks when its training loop starts and ends."""

    def on_train_start(self) -> None:
        self.loop_start = _clocks()

    def on_train_end(self) -> None:
        self.loop_end = _clocks()


def with_distloop(model: nn.Module, data: Batches, n_metrics: int) -> Run:
    """One epoch of ``trainer.fit``, the Trainer built before the clock starts."""
    module, trainer = ClockedBench(model, n_metrics, sync_dist=True), make_trainer()

    def fit() -> tuple[tuple[float, float], tuple[float, float]]:
        trainer.fit(module, data)
        return module.loop_start, module.loop_end

    return timed(fit)


def time_loops(dim: int, data: Batches, reps: int) -> dict[str, list[Run]]:
    """Every loop ``reps`` times, interleaved, the order rotating every repetition."""
    loops: dict[str, Callable[[nn.Module], Run]] = {
        HAND: lambda m: timed(lambda: hand_written(m, data)),
        HAND_VALUES: lambda m: timed(lambda: hand_written(m, data, TIMED_CASES["8 metrics"])),
    }
    for case, n_metrics in TIMED_CASES.items():
        loops[f"distloop, {case}"] = lambda m, n=n_metrics: with_distloop(m, data, n)

    trained = {}
    for name, loop in loops.items():  # warm-up, and a check that every loop does the same work
        trained[name] = fresh_model(dim)
        loop(trained[name])
    reference = trained[HAND].state_dict()
    for name, model in trained.items():
        assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items()), name

    runs: dict[str, list[Run]] = {name: [] for name in loops}
    names = list(loops)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            model = fresh_model(dim)
            gc.collect()
            runs[name].append(loops[name](model))
    return runs


# ---------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def describe(calls: list[Call]) -> str:
    """``name by caller`` for each distinct call, with a count where it repeats."""
    counts = Counter((c.name, c.caller) for c in calls)
    return ", ".join(f"{name} by {caller}" + (f" x{n}" if n > 1 else "") for (name, caller), n in counts.items())


def points(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 2 else f"{len(names)} sync points: {names[0]} ... {names[-1]}"


def report_counts(counts: list[Counted]) -> None:
    print("(a) collectives issued by distloop in one fit, model gradients excluded "
          "(torch.distributed wrapped on each rank; rank 0's calls; per step = total / steps)")
    step_bar = f"bar per step <= {MAX_PER_STEP}"
    print(f"{'metrics':>7}{'total':>7}{'per step':>10}{'sync points':>13}   {'max at one sync point':<24}"
          f"{step_bar}   bar per sync point <= {MAX_PER_SYNC_POINT}")
    for c in counts:
        per_point = c.per_point
        per_step = len(c.training) / c.steps
        worst = max(per_point.values())
        worst_at = points([p for p, n in per_point.items() if n == worst])
        print(f"{c.n_metrics:>7}{len(c.training):>7}{per_step:>10.3f}{len(per_point):>13}   "
              f"{f'{worst} ({worst_at})':<24}{verdict(per_step <= MAX_PER_STEP):<{len(step_bar) + 3}}"
              f"{verdict(worst <= MAX_PER_SYNC_POINT)}")
    details: dict[tuple[str, ...], list[int]] = {}  # the same calls are described once for all their cases
    for c in counts:
        details.setdefault(call_details(c), []).append(c.n_metrics)
    for lines, cases in details.items():
        print(f"  calls with {' and '.join(map(str, cases))} metrics:")
        for line in lines:
            print(f"    {line}")


def call_details(c: Counted) -> tuple[str, ...]:
    """What was called where: sync points with the same calls share a line."""
    groups: dict[str, list[str]] = {}
    for point in c.per_point:
        groups.setdefault(describe([x for x in c.training if x.where == point]), []).append(point)
    return (*(f"{points(where)}{', each' if len(where) > 1 else ''}: {what}" for what, where in groups.items()),
            f"one-off, before training: {describe(c.setup)}",
            f"anyone else's during training: {describe(c.others) or 'none'} "
            "(DDP's gradient all-reduce runs in its C++ reducer, unseen)")


def report_speed(steps: int, runs: dict[str, list[Run]]) -> None:
    hand = runs[HAND]
    print(f"(b) speed, median of {len(hand)} runs interleaved after a warm-up (rank 0's clocks); hand-written = new "
          "gloo group + DDP + optimizer + loop, no logging; distloop = trainer.fit()")
    print(f"    {HAND_VALUES} = the same, also computing (and dropping) the 8 values the module logs, "
          "as the module computes them")
    print("    paired = hand-written's time / this loop's in the same repetition, quartiles; CPU = the rank's main "
          "thread (the loop's own work, not gloo's threads)")
    print("    CPU-based = hand-written's median step time / (that + the extra CPU): the ratio if only the extra "
          "work counted, which other processes disturb far less than the wall clock")
    speed_table(steps, runs, lambda r: r.wall, lambda r: r.cpu)
    print("\n(c) the training loop alone, from its first batch to its last: (b) without the one-off set-up and "
          "teardown\n    of both loops, i.e. what a long run pays per step")
    speed_table(steps, runs, lambda r: r.loop_wall, lambda r: r.loop_cpu)


@dataclass(frozen=True)
class Ratio:
    """One loop's speed against a reference loop's."""

    step_us: float  # this loop's median step time
    measured: float  # reference's median step time / this loop's
    paired: tuple[float, float]  # quartiles of reference time / this loop's time, repetition by repetition
    cpu_us: float  # this loop's median main-thread CPU per step
    extra_cpu_us: float  # that minus the reference's
    cpu_based: float  # reference's step time / (that + the extra CPU)


def ratio(steps: int, reference: list[Run], runs: list[Run], wall_of: Callable[[Run], float],
          cpu_of: Callable[[Run], float]) -> Ratio:
    ref_step = statistics.median(map(wall_of, reference)) / steps * 1e6
    step = statistics.median(map(wall_of, runs)) / steps * 1e6
    q1, _, q3 = statistics.quantiles([wall_of(h) / wall_of(r) for h, r in zip(reference, runs)], n=4)
    cpu = statistics.median(map(cpu_of, runs)) / steps * 1e6
    extra = cpu - statistics.median(map(cpu_of, reference)) / steps * 1e6
    return Ratio(step, ref_step / step, (q1, q3), cpu, extra, ref_step / (ref_step + extra))


def speed_table(steps: int, runs: dict[str, list[Run]], wall_of: Callable[[Run], float],
                cpu_of: Callable[[Run], float]) -> None:
    print(f"{'loop':<25}{'steps/s':>8}{'vs hand-written':>17}{'paired':>14}{'CPU us/step':>13}{'extra CPU':>11}"
          f"{'CPU-based':>11}   bar >= {MIN_SPEED_RATIO}: measured, CPU-based")
    for name, loop_runs in runs.items():
        r = ratio(steps, runs[HAND], loop_runs, wall_of, cpu_of)
        bar = f"{verdict(r.measured >= MIN_SPEED_RATIO)}, {verdict(r.cpu_based >= MIN_SPEED_RATIO)}" if name == LOGGED else ""
        print(f"{name:<25}{1e6 / r.step_us:>8.1f}{r.measured:>17.3f}{f'{r.paired[0]:.2f}-{r.paired[1]:.2f}':>14}"
              f"{r.cpu_us:>13.0f}{r.extra_cpu_us:>+11.0f}{r.cpu_based:>11.3f}   {bar}")
    alone = ratio(steps, runs[HAND_VALUES], runs[LOGGED], wall_of, cpu_of)
    print(f"logging alone ({LOGGED} vs {HAND_VALUES}): {alone.measured:.3f} measured (paired "
          f"{alone.paired[0]:.2f}-{alone.paired[1]:.2f}), {alone.extra_cpu_us:+.0f} us CPU per step, "
          f"{alone.cpu_based:.3f} CPU-based")


def report(args: argparse.Namespace, counts: list[Counted], runs: dict[str, list[Run]]) -> None:
    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"distloop DDP benchmark, {now}")
    print(f"machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}, torch {torch.__version__}")
    print(f"code:    {code_version()}")
    print(f"run:     world size {WORLD_SIZE}, gloo, CPU, {torch.get_num_threads()} thread per rank; "
          f"Sequential(Linear({args.dim}, {args.dim}), ReLU, Linear({args.dim}, {args.dim})), SGD, MSE; "
          f"batch {args.batch} per rank; {args.steps} steps per fit; log_every_n_steps={LOG_EVERY};")
    print("         metrics logged with sync_dist=True, on_step=True, on_epoch=True; "
          "both loops' DDP with gradient_as_bucket_view=True (distloop's default)\n")
    report_counts(counts)
    print()
    report_speed(args.steps, runs)


# ---------------------------------------------------------------- ranks
def rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    """One rank: counts, then timings; rank 0 prints the report."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    # The default group only synchronises the runs' starts: distloop, finding it, makes its own groups
    # (dist.new_group), so the hand-written loop makes one too: on 2 cores a fresh gloo group measured
    # ~10% slower than the long-lived default one, so both loops must start from the same kind.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        data = make_data(rank, args.steps, args.batch, args.dim)
        counts = [count_collectives(n, args.dim, data) for n in COUNTED_METRICS]
        runs = time_loops(args.dim, data, args.reps)
        if rank == 0:
            report(args, counts, runs)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="training steps per fit (per rank)")
    parser.add_argument("--reps", type=int, default=11, help="timed runs per loop")
    parser.add_argument("--batch", type=int, default=64, help="batch size per rank")
    parser.add_argument("--dim", type=int, default=256, help="width of the two Linear layers")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds before the ranks are killed")
    args = parser.parse_args()
    start, busy, own = time.monotonic(), machine_cpu_seconds(), own_cpu_seconds()
    ctx = mp.start_processes(rank_main, args=(free_port(), args), nprocs=WORLD_SIZE, join=False,
                             start_method="spawn")
    while not ctx.join(timeout=1.0):
        if time.monotonic() > start + args.deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the ranks did not finish within {args.deadline}s")
    others = max(0.0, (machine_cpu_seconds() - busy) - (own_cpu_seconds() - own))
    print(f"\nother processes used {others / (time.monotonic() - start):.2f} of the {os.cpu_count()} cores "
          "on average during this run (they share the cores with the ranks)")


if __name__ == "__main__":
    main()
