"""Checkpoint costs: how long a save blocks training, and how fast a mid-epoch resume starts.

    python benchmarks/checkpoint.py [--reps 8] [--optimizer adam] [--dir /tmp]

(a) A ~200 MB model (12 x ``nn.Linear(2048, 2048)``, 50.4M float32 parameters) trains
    with Adam (its state doubles the checkpoint) or SGD without momentum. At scheduled
    batches a callback's ``on_train_batch_end`` saves, timed with ``time.perf_counter``:
    ``trainer.save_checkpoint(path, blocking=False)`` (ModelCheckpoint's path: snapshot
    here, atomic write on a background thread), ``trainer.save_checkpoint(path)`` (the
    atomic write on the training thread), a plain ``torch.save`` of
    ``{"module": ..., "optimizer": ...}`` to a path, and the same ``torch.save`` into an
    open file followed by ``fsync``. The four take turns (each follows each other one
    equally often), each to a new file in one directory; before each save, untimed, the
    previous write completes, old files are deleted and dirty pages flushed (``os.sync``).
    The steps after each save are timed too, to see how much a background write slows
    training.
(b) A map-style dataset (200k samples; each fetch spins 30 us, standing in for decoding
    a record) in a plain ``DataLoader(batch_size=32, shuffle=True)``. Checkpoints are
    written by ``ModelCheckpoint`` at 5% and 95% of the epoch; a resumed
    ``trainer.fit(..., ckpt_path=...)`` is timed from the call until its first training
    batch starts, and that batch is checked against the uninterrupted run's next batch.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import distloop
from _common import cpu_model

SEED = 0
# (a)
WIDTH, DEPTH, BIG_BATCH = 2048, 12, 16
WARMUP, QUIET, FOLLOW = 3, 2, 8  # steps: before the first slot; per slot before the save; timed after it
BACKGROUND, BLOCKING, TORCH_SAVE, TORCH_SAVE_FSYNC = (
    "distloop blocking=False", "distloop blocking=True", "torch.save(state, path)", "torch.save + fsync")
METHODS = (BACKGROUND, BLOCKING, TORCH_SAVE, TORCH_SAVE_FSYNC)
BAR_SAVE = 1.2  # max ratio of distloop's blocked time to torch.save's
# (b)
SAMPLES, DIM, BATCH, FETCH_US = 200_000, 32, 32, 30.0
FRACTIONS = (0.05, 0.95)
BAR_RESUME_REL = 0.10  # start-ups count as equal within this fraction, or within the runs' own spread


# ---------------------------------------------------------------- (a) save: blocked time
class BigModule(distloop.LoopModule):
    def __init__(self, optimizer: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(DEPTH):
            layers += [nn.Linear(WIDTH, WIDTH)] + ([nn.ReLU()] if i < DEPTH - 1 else [])
        self.net = nn.Sequential(*layers)
        self.optimizer_name = optimizer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-5)
        return torch.optim.SGD(self.parameters(), lr=1e-4)


@dataclass
class Save:
    method: str
    batch_idx: int
    started: float = 0.0  # time.perf_counter() at the call
    blocked: float = 0.0  # seconds the training thread spent in the save
    on_disk: float | None = None  # seconds from the call until a background write was complete


class SaveProbe(distloop.Callback):
    """Saves at the scheduled batches (``batch_idx -> method``), timing each; notes when every batch starts."""

    def __init__(self, schedule: dict[int, str], directory: str) -> None:
        self.schedule = schedule
        self.directory = directory
        self.starts: list[float] = []
        self.saves: list[Save] = []

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 in self.schedule:
            self._settle(trainer)
        method = self.schedule.get(batch_idx)
        if method is None:
            return
        save = Save(method, batch_idx)
        path = os.path.join(self.directory, f"batch-{batch_idx}.ckpt")
        save.started = t0 = time.perf_counter()
        if method == BACKGROUND:
            def written(_: str) -> None:
                save.on_disk = time.perf_counter() - t0
            trainer.save_checkpoint(path, blocking=False, then=written)
        elif method == BLOCKING:
            trainer.save_checkpoint(path)
        elif method == TORCH_SAVE:
            torch.save({"module": module.state_dict(), "optimizer": trainer.optimizer.state_dict()}, path)
        else:
            with open(path, "wb") as f:
                torch.save({"module": module.state_dict(), "optimizer": trainer.optimizer.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
        save.blocked = time.perf_counter() - t0
        self.saves.append(save)

    def _settle(self, trainer: Any) -> None:
        """Before a timed save: no write in flight, no old files, no dirty pages, no garbage."""
        trainer.strategy.wait_for_checkpoints()
        for name in os.listdir(self.directory):
            os.remove(os.path.join(self.directory, name))
        gc.collect()
        os.sync()


def save_orders() -> list[tuple[str, ...]]:
    """A Williams design: over ``len(METHODS)`` repetitions each method follows each other one exactly once."""
    n = len(METHODS)
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    return [tuple(METHODS[(i + rep) % n] for i in first) for rep in range(n)]


def save_schedule(reps: int) -> tuple[dict[int, str], int]:
    """``batch_idx -> method`` for ``reps`` repetitions of every method, and the number of steps to run."""
    slot = QUIET + 2 + FOLLOW  # quiet steps, the step that settles, the save step, the steps after it
    orders = save_orders()
    methods = [m for rep in range(reps) for m in orders[rep % len(orders)]]
    schedule = {WARMUP + k * slot + QUIET + 1: method for k, method in enumerate(methods)}
    return schedule, WARMUP + len(methods) * slot + 1


@dataclass
class SaveResult:
    parameters: int
    checkpoint_mb: float
    step_ms: float  # median step without a save nearby
    blocked_ms: dict[str, list[float]]
    lost_ms: dict[str, list[float]]  # time of the save step and the FOLLOW steps after it, beyond the median
    on_disk_ms: list[float]  # background writes
    late_writes: int  # background writes still running when their FOLLOW steps were over


def measure_saves(reps: int, optimizer: str, directory: str) -> SaveResult:
    torch.manual_seed(SEED)
    module = BigModule(optimizer)
    schedule, steps = save_schedule(reps)
    probe = SaveProbe(schedule, directory)
    x, y = torch.randn(BIG_BATCH, WIDTH), torch.randn(BIG_BATCH, WIDTH)
    trainer = distloop.Trainer(max_epochs=1, max_steps=steps, logger=False, enable_progress_bar=False,
                               num_sanity_val_steps=0, accelerator="cpu", default_root_dir=directory,
                               callbacks=[probe])
    trainer.fit(module, [(x, y)] * steps)
    checkpoint_mb = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    checkpoint_mb += sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                         for t in s.values() if isinstance(t, Tensor))
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))

    durations = [b - a for a, b in zip(probe.starts, probe.starts[1:])]
    busy = {i for s in schedule for i in range(s - 1, s + FOLLOW + 1)}  # settling, saving, following
    step = statistics.median(d for i, d in enumerate(durations) if i >= WARMUP and i not in busy)
    blocked: dict[str, list[float]] = {m: [] for m in METHODS}
    lost: dict[str, list[float]] = {m: [] for m in METHODS}
    on_disk, late = [], 0
    for save in probe.saves:
        i = save.batch_idx
        end = probe.starts[i + FOLLOW + 1]
        window = end - probe.starts[i]
        blocked[save.method].append(save.blocked * 1e3)
        lost[save.method].append((window - (FOLLOW + 1) * step) * 1e3)
        if save.method == BACKGROUND:
            assert save.on_disk is not None
            on_disk.append(save.on_disk * 1e3)
            late += save.started + save.on_disk > end
    parameters = sum(p.numel() for p in module.parameters())
    return SaveResult(parameters, checkpoint_mb / 1e6, step * 1e3, blocked, lost, on_disk, late)


# ---------------------------------------------------------------- (b) resume start-up
class SlowDataset(Dataset):
    """``SAMPLES`` rows of ``DIM`` features; each fetch spins ``FETCH_US`` (standing in for decoding)."""

    def __init__(self) -> None:
        self.x = torch.randn(SAMPLES, DIM, generator=torch.Generator().manual_seed(SEED))

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        end = time.perf_counter() + FETCH_US * 1e-6
        while time.perf_counter() < end:
            pass
        x = self.x[index]
        return x, x.flip(0)


class SmallModule(distloop.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(DIM, DIM)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FirstBatch(distloop.Callback):
    """Notes when the first training batch starts and keeps its inputs; the run stops after that batch."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.x: Tensor | None = None

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.at, self.x = time.perf_counter(), batch[0].clone()
        trainer.should_stop = True


class BatchAt(distloop.Callback):
    """Keeps the inputs of the batch at ``index``: where a run resumed just before it must start."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.x: Tensor | None = None

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.index:
            self.x = batch[0].clone()


def small_trainer(root: str, callbacks: list[distloop.Callback], max_steps: int = -1) -> distloop.Trainer:
    return distloop.Trainer(max_epochs=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                            num_sanity_val_steps=0, accelerator="cpu", default_root_dir=root, callbacks=callbacks)


def make_checkpoint(loader: DataLoader, step: int, root: str) -> tuple[str, Tensor]:
    """Train ``step`` steps, saving there with ModelCheckpoint, then one more; the file and that next batch."""
    checkpoint, next_batch = distloop.ModelCheckpoint(dirpath=os.path.join(root, f"step-{step}"),
                                                      every_n_train_steps=step), BatchAt(step)
    torch.manual_seed(SEED)
    small_trainer(root, [checkpoint, next_batch], max_steps=step + 1).fit(SmallModule(), loader)
    assert next_batch.x is not None
    return checkpoint.last_model_path, next_batch.x


def time_resume(loader: DataLoader, path: str, root: str) -> tuple[float, Tensor]:
    """Seconds from ``fit(ckpt_path=path)`` to the start of its first batch, and that batch's inputs."""
    first = FirstBatch()
    trainer = small_trainer(root, [first])
    module = SmallModule()
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=path)
    assert first.at is not None and first.x is not None
    return first.at - t0, first.x


def time_replay(dataset: Dataset, batches: int) -> float:
    """Seconds to iterate a plain shuffled DataLoader through ``batches`` batches (a naive resume)."""
    t0 = time.perf_counter()
    for i, _ in enumerate(DataLoader(dataset, batch_size=BATCH, shuffle=True), 1):
        if i == batches:
            break
    return time.perf_counter() - t0


def fetch_us(dataset: Dataset, n: int = 2000) -> float:
    """Microseconds per ``dataset[i]``."""
    t0 = time.perf_counter()
    for i in range(n):
        dataset[i]
    return (time.perf_counter() - t0) / n * 1e6


@dataclass
class ResumeResult:
    fetch_us: float
    batches: int
    steps: dict[float, int]
    startup_ms: dict[float, list[float]]
    exact: dict[float, bool]  # every resumed run started at the uninterrupted run's next batch
    replay_s: dict[float, float]


def measure_resume(reps: int, root: str) -> ResumeResult:
    dataset = SlowDataset()
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    batches = math.ceil(SAMPLES / BATCH)
    steps = {f: int(f * batches) for f in FRACTIONS}
    made = {f: make_checkpoint(loader, steps[f], root) for f in FRACTIONS}
    time_resume(loader, made[FRACTIONS[0]][0], root)  # warm-up
    startup: dict[float, list[float]] = {f: [] for f in FRACTIONS}
    exact = dict.fromkeys(FRACTIONS, True)
    for _ in range(reps):
        for f in FRACTIONS:
            path, expected = made[f]
            seconds, x = time_resume(loader, path, root)
            startup[f].append(seconds * 1e3)
            exact[f] &= torch.equal(x, expected)
    replay = {f: time_replay(dataset, steps[f]) for f in FRACTIONS}
    return ResumeResult(fetch_us(dataset), batches, steps, startup, exact, replay)


# ---------------------------------------------------------------- report

def disk_note(path: str) -> str:
    """The file system and device that ``path`` lives on: the innermost mount in /proc/mounts that holds it."""
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        mounts = [line.split()[:3] for line in f]
    device, mount, fstype = max((m for m in mounts if os.path.commonpath([path, m[1]]) == m[1]),
                                key=lambda m: len(m[1]))
    return f"{path} on {fstype} ({device}, mounted at {mount})"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_saves(r: SaveResult, reps: int, optimizer: str) -> None:
    state = "Adam (its state is 2x the parameters)" if optimizer == "adam" else "SGD without momentum (no state)"
    print(f"(a) Save: {DEPTH} x nn.Linear({WIDTH}, {WIDTH}), {r.parameters / 1e6:.1f}M float32 parameters, "
          f"{state}: {r.checkpoint_mb:.0f} MB of tensors")
    print(f"    batch {BIG_BATCH}; a step without saving takes {r.step_ms:.0f} ms (median); each save is timed "
          f"inside on_train_batch_end; median (min-max) of {reps} interleaved saves")
    print(f"    'time lost' = time of the save step and the next {FOLLOW} steps minus {FOLLOW + 1} x the median "
          "step: blocked time plus any slowdown while writing (noisy where other jobs share the CPUs)")
    print()
    base, base_fsync = statistics.median(r.blocked_ms[TORCH_SAVE]), statistics.median(r.blocked_ms[TORCH_SAVE_FSYNC])
    print(f"    {'method':<26}{'blocked ms':>18}{'time lost ms':>20}{'until on disk ms':>20}"
          f"{'/ torch.save':>14}{'/ +fsync':>10}")
    for method in METHODS:
        blocked = statistics.median(r.blocked_ms[method])
        if method == BACKGROUND:
            on_disk = spread(r.on_disk_ms)
        elif method == TORCH_SAVE:
            on_disk = "later (no fsync)"
        else:
            on_disk = "= blocked"
        print(f"    {method:<26}{spread(r.blocked_ms[method]):>18}{spread(r.lost_ms[method]):>20}{on_disk:>20}"
              f"{blocked / base:>14.2f}{blocked / base_fsync:>10.2f}")
    print("    distloop's writes: tmp file, torch.save, flush, fsync, rename, fsync of the directory. "
          "torch.save(state, path) does not fsync.")
    if r.late_writes:
        print(f"    note: {r.late_writes} background write(s) outlasted their {FOLLOW} timed steps; "
              "'time lost' misses part of their effect")
    background = statistics.median(r.blocked_ms[BACKGROUND])
    blocking = statistics.median(r.blocked_ms[BLOCKING])
    print(f"    bar: blocked by blocking=False (ModelCheckpoint's path) / torch.save(state, path) = "
          f"{background / base:.2f} <= {BAR_SAVE}  {verdict(background / base <= BAR_SAVE)}")
    print(f"    bar: blocked by blocking=True / torch.save + fsync (like for like) = "
          f"{blocking / base_fsync:.2f} <= {BAR_SAVE}  {verdict(blocking / base_fsync <= BAR_SAVE)}")


def report_resume(r: ResumeResult, reps: int) -> None:
    print(f"(b) Resume start-up: {SAMPLES} samples ({r.fetch_us:.0f} us per fetch, measured), batch {BATCH}, "
          f"{r.batches} batches per epoch, plain DataLoader(shuffle=True, num_workers=0), nn.Linear({DIM}, {DIM})")
    print(f"    timed: trainer.fit(ckpt_path=...) until its first on_train_batch_start (Trainer and module built "
          f"before); median (min-max) of {reps} interleaved runs after a warm-up; naive replay timed once")
    print()
    print(f"    {'checkpoint at':<16}{'step':>8}{'start-up ms':>18}{'starts at the right batch':>28}"
          f"{'naive replay s':>17}")
    for f in FRACTIONS:
        print(f"    {f'{f:.0%} of epoch':<16}{r.steps[f]:>8}{spread(r.startup_ms[f]):>18}"
              f"{'yes' if r.exact[f] else 'NO':>28}{r.replay_s[f]:>17.2f}")
    print("    naive replay = iterating a plain shuffled DataLoader through the batches already trained on "
          "(what distloop avoids)")
    early, late = (statistics.median(r.startup_ms[f]) for f in FRACTIONS)
    noise = max(BAR_RESUME_REL * early, *(max(v) - min(v) for v in r.startup_ms.values()))
    ok = abs(late - early) <= noise and all(r.exact.values())
    print(f"    bar: start-up at {FRACTIONS[1]:.0%} - at {FRACTIONS[0]:.0%} = {late - early:+.1f} ms, within noise "
          f"(<= {noise:.1f} ms: the larger of {BAR_RESUME_REL:.0%} and either set's spread), "
          f"at the right batch  {verdict(ok)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=8, help="measurements per save method and resume point")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                        help="adam (checkpoint ~600 MB) or sgd without momentum (~200 MB)")
    parser.add_argument("--dir", default=None, help="where to write the files (default: the system's temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="distloop-ckpt-bench-", dir=args.dir) as root:
        saves_dir, resume_dir = os.path.join(root, "saves"), os.path.join(root, "resume")
        os.makedirs(saves_dir)
        saves = measure_saves(args.reps, args.optimizer, saves_dir)
        resume = measure_resume(args.reps, resume_dir)
        disk = disk_note(root)

    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"distloop checkpoint benchmark  ({now}, {platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}, distloop {distloop.__version__})")
    print("single process, CPU, torch.set_num_threads(1) (the background writer thread can use another core); "
          f"load average before/after: {load_before:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"disk: {disk}; every file of a part goes to the same directory")
    print()
    report_saves(saves, args.reps, args.optimizer)
    print()
    report_resume(resume, args.reps)


if __name__ == "__main__":
    main()
