"""distloop's FSDP2 on CPU: memory per rank against DDP, speed against a hand-written FSDP2 loop, checkpoint stalls.

    python benchmarks/fsdp.py [--ranks 2 4] [--steps 20] [--reps 10] [--batch 32] [--dim 512] [--blocks 8]
                              [--ckpt-reps 3] [--time-ranks 2] [--dir /tmp] [--json out.json] [--quick]

For each world size in ``--ranks``, that many ranks are spawned here, one thread each, over gloo
on the CPU (over NCCL, one GPU per rank, where CUDA has a GPU for every rank). Every run trains
``Sequential(blocks x Block)``, ``Block = (Linear(dim, dim), ReLU)``, with MSE and AdamW, on the
rank's own shard of pre-batched in-memory data: a list of ``(x, y)`` tuples, which distloop does
not re-shard, so loading a batch costs the same in every loop. distloop shards it with
``FSDPStrategy(shard_modules=[Block])``: ``fully_shard`` on each block, then on the root.

(1) Memory: after a few steps (just before the last ``zero_grad``, when gradients and optimizer
    state both exist), the bytes each rank holds in parameters, gradients and AdamW state, from
    the tensors themselves (a DTensor's local shard), under distloop's FSDPStrategy, a
    hand-written FSDP2 loop and distloop's DDPStrategy. Bar: FSDP <= DDP / N + one layer
    unsharded (one Block's parameters, gradients and AdamW state as DDP holds them).
(2) Speed: ``trainer.fit`` (the Trainer built before the clock starts) against a hand-written
    FSDP2 loop (new gloo group, DeviceMesh over it, ``fully_shard`` per block then the root,
    AdamW, loop), same initial weights, data and batch size, run interleaved after a warm-up that
    checks both end with the same weights; the median of ``--reps`` runs, timed as ddp.py times
    them: the whole fit, and the training loop alone. On CUDA the steady-state steps run under
    ``torch.cuda.set_sync_debug_mode("error")``: a host sync there fails the run.
(3) Checkpoint: how long ``trainer.save_checkpoint(path, blocking=False)`` (returns once the
    state is staged) and ``trainer.save_checkpoint(path, blocking=True)`` keep training waiting,
    under FSDPStrategy's sharded checkpoints (a directory written with torch.distributed.checkpoint,
    the default), its full ones (one file gathered on rank 0) and DDP's single file, for the same
    model; each save is timed on every rank from a barrier, the slowest rank counts, and before
    each one ``trainer.strategy.wait_for_checkpoints()`` finishes the previous write (untimed).
    Bar: the sharded default's blocked time with blocking=False / with blocking=True <= 0.2.

(2) and (3) run for the world sizes in ``--time-ranks``: by default those that fit the machine's
cores (or GPUs), since ranks that share a core time the scheduler more than the loops.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import distloop
from _common import Bench, code_version, cpu_model, loop_only, machine_cpu_seconds, own_cpu_seconds
from distloop.errors import MisconfigurationError
from distloop.strategies import DDPStrategy
from distloop.strategies.ddp import free_port
from distloop.strategies.fsdp import FSDPStrategy

SEED, LR = 0, 1e-3  # AdamW's learning rate
TIMEOUT_S = 120.0  # every process group's
MEMORY_STEPS = 3  # (1): measured before the zero_grad of this step
WARMUP_STEPS = 2  # (2): steps before the steady state (CUDA: before set_sync_debug_mode("error"))
CKPT_WARMUP = 2  # (3): steps before the first save
MIN_SPEED_RATIO, MAX_ASYNC_RATIO = 0.97, 0.2
HAND, DISTLOOP = "hand-written FSDP2", "distloop FSDP"
ASYNC, BLOCKING = "blocking=False", "blocking=True"
SHARDED, FULL, DDP_FILE = "FSDP sharded (default)", "FSDP full (rank-0 file)", "DDP (rank-0 file)"
QUICK = {"steps": 8, "reps": 2, "ckpt_reps": 1}  # --quick: ~30 s on 2 cores

Batches = list[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------- model, data, devices
class Block(nn.Module):
    """One layer: what distloop and the hand-written loop each shard on its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))


def fresh_model(args: argparse.Namespace, device: torch.device) -> nn.Sequential:
    """The same initial weights for every run, on ``device``."""
    torch.manual_seed(SEED)
    return nn.Sequential(*(Block(args.dim) for _ in range(args.blocks))).to(device)


def make_data(rank: int, steps: int, args: argparse.Namespace, device: torch.device) -> Batches:
    """This rank's shard: ``steps`` batches of random regression data from a per-rank seed, on ``device``."""
    g = torch.Generator().manual_seed(SEED * 1000 + rank)
    return [(torch.randn(args.batch, args.dim, generator=g).to(device),
             torch.randn(args.batch, args.dim, generator=g).to(device)) for _ in range(steps)]


def uses_cuda(world_size: int) -> bool:
    """NCCL on CUDA when there is a GPU for every rank (NCCL refuses two ranks on one GPU)."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= world_size


def device_of(rank: int, world_size: int) -> torch.device:
    return torch.device("cuda", rank) if uses_cuda(world_size) else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Before reading a clock: the device's queued work done (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_debug(device: torch.device, on: bool) -> None:
    """On CUDA, make any host sync raise (``on``) or be allowed again; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error" if on else 0)


class AdamWBench(Bench):
    """_common's ``Bench`` (MSE), trained with AdamW; no metrics are logged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, n_metrics=0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


def fsdp_strategy(device: torch.device, state_dict_type: str | None = None) -> FSDPStrategy:
    """distloop's FSDP, one block per FSDP unit; ``state_dict_type`` passed only when given."""
    extra = {} if state_dict_type is None else {"state_dict_type": state_dict_type}
    return FSDPStrategy(accelerator=device.type, timeout_s=TIMEOUT_S, shard_modules=[Block], **extra)


def ddp_strategy(device: torch.device) -> DDPStrategy:
    return DDPStrategy(accelerator=device.type, timeout_s=TIMEOUT_S)


def make_trainer(strategy: Any, steps: int, callbacks: list[distloop.Callback] | None = None,
                 root: str | None = None) -> distloop.Trainer:
    return distloop.Trainer(strategy=strategy, max_epochs=1, max_steps=steps, logger=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=10 ** 6,
                            callbacks=callbacks or [], default_root_dir=root, **loop_only())


# ---------------------------------------------------------------- (1) memory
def local(t: Tensor) -> Tensor:
    """A DTensor's local part (this rank's shard); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """The bytes of the distinct storages behind ``tensors``: what a view keeps alive (a bucket, a padded shard)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = local(t).untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def held_bytes(module: nn.Module, optimizer: torch.optim.Optimizer, layer: str) -> dict[str, int]:
    """What this rank holds in parameters, gradients and ``optimizer``'s state, and the part of it
    that belongs to the parameters named ``layer.*``."""
    named = list(module.named_parameters())
    params = [p for _, p in named]
    grads = [p.grad for p in params if p.grad is not None]
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor)]
    in_layer = [p for n, p in named if n.startswith(layer + ".")]
    layer_tensors = [*in_layer, *(p.grad for p in in_layer if p.grad is not None),
                     *(t for p in in_layer for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor))]
    return {"params": tensor_bytes(params), "grads": tensor_bytes(grads), "optimizer": tensor_bytes(state),
            "storage": storage_bytes([*params, *grads, *state]), "layer": tensor_bytes(layer_tensors)}


class MemoryProbe(distloop.Callback):
    """Measures before the ``zero_grad`` of step ``at``: gradients and optimizer state both exist."""

    def __init__(self, at: int, layer: str) -> None:
        self.at, self.layer = at, layer
        self.steps = 0
        self.bytes: dict[str, int] = {}

    def on_before_zero_grad(self, trainer: Any, module: Any, optimizer: Any) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.bytes = held_bytes(module, optimizer, self.layer)


def distloop_memory(strategy: Any, args: argparse.Namespace, data: Batches, device: torch.device) -> dict[str, int]:
    probe = MemoryProbe(MEMORY_STEPS, "model.0")
    make_trainer(strategy, MEMORY_STEPS, [probe]).fit(AdamWBench(fresh_model(args, device)), data)
    return probe.bytes


def hand_memory(args: argparse.Namespace, data: Batches, device: torch.device) -> dict[str, int]:
    found: dict[str, int] = {}

    def probe(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if step == MEMORY_STEPS - 1:
            found.update(held_bytes(model, optimizer, "0"))

    hand_written(fresh_model(args, device), data[:MEMORY_STEPS], device, before_zero_grad=probe)
    return found


def measure_memory(args: argparse.Namespace, data: Batches, device: torch.device) -> dict[str, dict[str, int]]:
    """Each rank's bytes, for each loop: ``loop -> {part: [rank 0's, rank 1's, ...]}``."""
    mine = {DISTLOOP: distloop_memory(fsdp_strategy(device), args, data, device),
            HAND: hand_memory(args, data, device),
            "distloop DDP": distloop_memory(ddp_strategy(device), args, data, device)}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return {loop: {part: [r[loop][part] for r in everyone] for part in mine[loop]} for loop in mine}


# ---------------------------------------------------------------- (2) speed
def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


Clocks = tuple[tuple[float, float], tuple[float, float]]


def hand_written(model: nn.Sequential, data: Batches, device: torch.device,
                 before_zero_grad: Callable[[nn.Module, torch.optim.Optimizer, int], None] | None = None) -> Clocks:
    """One epoch of plain FSDP2 on a process group of its own, made and destroyed as distloop's fit does;
    returns the clocks at the loop's start and end."""
    group = dist.new_group(backend="nccl" if device.type == "cuda" else "gloo",
                           timeout=datetime.timedelta(seconds=TIMEOUT_S))
    mesh = DeviceMesh.from_group(group, device.type)
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    synchronize(device)
    loop_start = _clocks()
    for i, (x, y) in enumerate(data):
        if i == WARMUP_STEPS:
            sync_debug(device, True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if before_zero_grad is not None:
            before_zero_grad(model, optimizer, i)
        optimizer.zero_grad(set_to_none=True)
    sync_debug(device, False)
    synchronize(device)
    loop_end = _clocks()
    del optimizer, mesh
    dist.destroy_process_group(group)
    return loop_start, loop_end


class ClockedBench(AdamWBench):
    """Reads the clocks when its training loop starts and ends; on CUDA, its steady-state steps run
    under ``set_sync_debug_mode("error")`` (from batch ``WARMUP_STEPS`` to the end of the last one)."""

    def __init__(self, model: nn.Module, device: torch.device, steps: int) -> None:
        super().__init__(model)
        self.on, self.steps = device, steps  # LoopModule.device is a property

    def on_train_start(self) -> None:
        synchronize(self.on)
        self.loop_start = _clocks()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == WARMUP_STEPS:
            sync_debug(self.on, True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.steps - 1:
            sync_debug(self.on, False)

    def on_train_end(self) -> None:
        sync_debug(self.on, False)
        synchronize(self.on)
        self.loop_end = _clocks()


def timed(fn: Callable[[], Clocks]) -> dict[str, float]:
    """Run ``fn`` once every rank is ready: wall and main-thread CPU seconds, of the whole and of the loop."""
    dist.barrier()
    start = _clocks()
    loop_start, loop_end = fn()
    end = _clocks()
    return {"wall": end[0] - start[0], "cpu": end[1] - start[1],
            "loop_wall": loop_end[0] - loop_start[0], "loop_cpu": loop_end[1] - loop_start[1]}


def with_distloop(model: nn.Sequential, data: Batches, device: torch.device,
                  keep: list[Tensor] | None = None) -> dict[str, float]:
    """One epoch of ``trainer.fit``; ``keep`` receives the local shards of the trained weights."""
    module = ClockedBench(model, device, len(data))
    trainer = make_trainer(fsdp_strategy(device), len(data))

    def fit() -> Clocks:
        trainer.fit(module, data)
        return module.loop_start, module.loop_end

    run = timed(fit)
    if keep is not None:
        keep.extend(local(p).detach().clone() for p in model.parameters())
    return run


def time_loops(args: argparse.Namespace, data: Batches, device: torch.device) -> dict[str, list[dict[str, float]]]:
    """Both loops ``args.reps`` times, interleaved, the order alternating every repetition."""
    def hand(model: nn.Sequential) -> dict[str, float]:
        return timed(lambda: hand_written(model, data, device))

    def ours(model: nn.Sequential) -> dict[str, float]:
        return with_distloop(model, data, device)

    loops: dict[str, Callable[[nn.Sequential], dict[str, float]]] = {HAND: hand, DISTLOOP: ours}
    # Warm-up, and a check that both loops do the same work: the same local shards at the end.
    hand_model = fresh_model(args, device)
    hand(hand_model)
    trained: list[Tensor] = []
    with_distloop(fresh_model(args, device), data, device, keep=trained)
    assert all(torch.equal(local(a), b) for a, b in zip(hand_model.parameters(), trained)), \
        "distloop's FSDP and the hand-written loop trained different weights"

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
    names = list(loops)
    for rep in range(args.reps):
        for name in names[rep % 2:] + names[: rep % 2]:
            model = fresh_model(args, device)
            gc.collect()
            runs[name].append(loops[name](model))
    return runs


# ---------------------------------------------------------------- (3) checkpoint
def disk_size(path: str) -> tuple[int, int]:
    """Bytes and files at ``path`` (a file or a directory)."""
    if os.path.isfile(path):
        return os.path.getsize(path), 1
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
    return sum(sizes), len(sizes)


def clear(directory: str) -> None:
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


class SaveProbe(distloop.Callback):
    """Saves at the scheduled batches (``batch_idx -> method``), timing each on this rank; at the batch
    after each save, untimed: the write finished everywhere, its size noted, the files deleted."""

    def __init__(self, schedule: dict[int, str], directory: str) -> None:
        self.schedule, self.directory = schedule, directory
        self.saves: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx - 1 in self.schedule:
            self._settle(trainer)
        method = self.schedule.get(batch_idx)
        if method is None:
            return
        save: dict[str, Any] = {"method": method, "blocked": 0.0, "written": None}
        path = os.path.join(self.directory, f"batch-{batch_idx}.ckpt")
        dist.barrier()  # the default group, not distloop's: every rank starts the save together
        t0 = time.perf_counter()

        def written(_: str) -> None:
            save["written"] = time.perf_counter() - t0

        trainer.save_checkpoint(path, blocking=method == BLOCKING, then=written)
        save["blocked"] = time.perf_counter() - t0
        save["path"] = path
        self.saves.append(save)

    def _settle(self, trainer: Any) -> None:
        trainer.strategy.wait_for_checkpoints()
        error = trainer.strategy.checkpoint_error()
        if error is not None:
            raise error
        dist.barrier()
        if dist.get_rank() == 0:
            self.saves[-1]["bytes"], self.saves[-1]["files"] = disk_size(self.saves[-1]["path"])
            clear(self.directory)
        gc.collect()
        os.sync()
        dist.barrier()


def save_schedule(reps: int) -> tuple[dict[int, str], int]:
    """``batch_idx -> method``: a first, warm-up pair, then ``reps`` pairs, the order alternating;
    and the number of steps to run."""
    methods = [m for rep in range(reps + 1) for m in ((ASYNC, BLOCKING) if rep % 2 == 0 else (BLOCKING, ASYNC))]
    return {CKPT_WARMUP + 2 * k: m for k, m in enumerate(methods)}, CKPT_WARMUP + 2 * len(methods) + 1


def checkpoint_strategies(device: torch.device) -> dict[str, tuple[Callable[[], Any] | None, str]]:
    """What each row saves with: ``row -> (strategy factory or None, note)``, in the order they run. A
    ``state_dict_type`` that this version of FSDPStrategy does not accept makes its row n/a (the full
    row then falls back on ``FSDPStrategy()`` as it is).

    The full row runs first, in processes that have not sharded anything yet: with torch 2.13, once a
    DTensor was made on a DeviceMesh of a group since destroyed (an earlier fit's), a DTensor made on
    an equal mesh of a new group can carry the old mesh, and gathering it (what "full" does) fails
    with "Could not resolve the process group registered under the name 1"."""
    rows: dict[str, tuple[Callable[[], Any] | None, str]] = {}
    for row, kind in ((FULL, "full"), (SHARDED, "sharded")):
        try:
            strategy = fsdp_strategy(device, kind)
        except (TypeError, ValueError, MisconfigurationError) as err:
            if row == FULL:
                rows[row] = (lambda: fsdp_strategy(device), f"FSDPStrategy() as it is ({err})")
            else:
                rows[row] = (None, f"n/a: FSDPStrategy(state_dict_type={kind!r}) is not accepted ({err})")
            continue
        del strategy
        rows[row] = (lambda kind=kind: fsdp_strategy(device, kind), "")
    default = getattr(fsdp_strategy(device), "state_dict_type", None)
    if default != "sharded" and rows[SHARDED][0] is not None:
        rows[SHARDED] = (rows[SHARDED][0], f"note: FSDPStrategy()'s state_dict_type is {default!r}, not 'sharded'")
    rows[DDP_FILE] = (lambda: ddp_strategy(device), "")
    return rows


def measure_checkpoints(args: argparse.Namespace, device: torch.device, root: str) -> dict[str, Any]:
    """Every row's saves: ``row -> {"note", "saves": [...]}`` with each save's slowest-rank blocked time,
    or ``{"note", "error"}`` where its run failed (on every rank alike, or the collectives would hang)."""
    schedule, steps = save_schedule(args.ckpt_reps)
    data = make_data(dist.get_rank() + 100, steps, args, device)
    out: dict[str, Any] = {}
    for row, (factory, note) in checkpoint_strategies(device).items():
        out[row] = {"note": note}
        if factory is None:
            continue
        directory = os.path.join(root, f"ranks{dist.get_world_size()}-{len(out)}")
        if dist.get_rank() == 0:
            os.makedirs(directory)
        dist.barrier()
        probe = SaveProbe(schedule, directory)
        error = None
        try:
            make_trainer(factory(), steps, [probe], root=directory).fit(AdamWBench(fresh_model(args, device)), data)
        except Exception as err:  # noqa: BLE001 - reported in the table, the other rows still run
            error = f"{type(err).__name__}: {err}"
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (error, probe.saves))
        errors = [e for e, _ in everyone if e is not None]
        if errors:
            out[row]["error"] = errors[0].splitlines()[0][:300]
            continue
        saves = everyone[0][1]
        for i, save in enumerate(saves):
            save["blocked"] = max(r[1][i]["blocked"] for r in everyone)  # training waits for the slowest rank
        out[row]["saves"] = saves
    return out


# ---------------------------------------------------------------- ranks
def rank_main(rank: int, world_size: int, port: int, args: argparse.Namespace, result: str, root: str) -> None:
    """One rank: (where timed) checkpoints, memory, then (where timed) speed; rank 0 writes the results to
    ``result``. Checkpoints first: the full row must come before any other FSDP run (see checkpoint_strategies)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    device = device_of(rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The default group only synchronises the runs' starts: distloop, finding it, makes its own group
    # (dist.new_group), so the hand-written loop makes one too (see ddp.py).
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        data = make_data(rank, args.steps, args, device)
        out: dict[str, Any] = {"device": str(device.type)}
        if world_size in args.time_ranks:  # first: see checkpoint_strategies
            out["checkpoint"] = measure_checkpoints(args, device, root)
        out["memory"] = measure_memory(args, data, device)
        if world_size in args.time_ranks:
            out["speed"] = time_loops(args, data, device)
        if rank == 0:
            with open(result, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """Spawn ``world_size`` ranks, wait for them (killed at ``--deadline``), return rank 0's results."""
    result = os.path.join(root, f"result-{world_size}.json")
    ckpt_root = os.path.join(root, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    start = time.monotonic()
    ctx = mp.start_processes(rank_main, args=(world_size, free_port(), args, result, ckpt_root), nprocs=world_size,
                             join=False, start_method="spawn")
    while not ctx.join(timeout=1.0):
        if time.monotonic() > start + args.deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world_size} ranks did not finish within {args.deadline}s")
    print(f"fsdp.py: {world_size} ranks done in {time.monotonic() - start:.0f}s", file=sys.stderr)
    with open(result) as f:
        return json.load(f)


# ---------------------------------------------------------------- report
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def report_memory(results: dict[int, dict[str, Any]]) -> None:
    print(f"(1) memory per rank after {MEMORY_STEPS} steps, measured before the last zero_grad: parameters, "
          "gradients and AdamW state (exp_avg, exp_avg_sq, step),")
    print("    numel x element size of each tensor (a DTensor's local shard); MB = 1e6 bytes; the rank holding the "
          "most; 'storage' = the distinct storages behind them")
    print("    layer = one Block's parameters + gradients + AdamW state unsharded, as DDP holds them")
    print(f"{'ranks':>5}  {'loop':<20}{'params':>9}{'grads':>9}{'optimizer':>11}{'total':>9}{'storage':>9}"
          f"{'/ DDP':>8}   bar: FSDP total <= DDP/N + layer")
    for n, r in results.items():
        memory = r["memory"]
        totals = {loop: max(p + g + o for p, g, o in zip(m["params"], m["grads"], m["optimizer"]))
                  for loop, m in memory.items()}
        ddp = totals["distloop DDP"]
        layer = max(memory["distloop DDP"]["layer"])
        bar = ddp / n + layer
        for loop, m in memory.items():
            check = ""
            if loop != "distloop DDP":
                check = f"{mb(totals[loop])} <= {mb(ddp / n)} + {mb(layer)} = {mb(bar)}  {verdict(totals[loop] <= bar)}"
            print(f"{n:>5}  {loop:<20}{mb(max(m['params'])):>9}{mb(max(m['grads'])):>9}{mb(max(m['optimizer'])):>11}"
                  f"{mb(totals[loop]):>9}{mb(max(m['storage'])):>9}{totals[loop] / ddp:>8.3f}   {check}")


@dataclass(frozen=True)
class Ratio:
    """distloop's speed against the hand-written loop's (see ddp.py)."""

    step_us: float  # this loop's median step time
    measured: float  # hand-written's median step time / this loop's
    paired: tuple[float, float]  # quartiles of hand-written's time / this loop's, repetition by repetition
    cpu_us: float  # this loop's median main-thread CPU per step
    extra_cpu_us: float  # that minus hand-written's
    cpu_based: float  # hand-written's step time / (that + the extra CPU)


def ratio(steps: int, reference: list[dict[str, float]], runs: list[dict[str, float]], wall: str, cpu: str) -> Ratio:
    ref_step = statistics.median(r[wall] for r in reference) / steps * 1e6
    step = statistics.median(r[wall] for r in runs) / steps * 1e6
    paired = [h[wall] / r[wall] for h, r in zip(reference, runs)]
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
    cpu_us = statistics.median(r[cpu] for r in runs) / steps * 1e6
    extra = cpu_us - statistics.median(r[cpu] for r in reference) / steps * 1e6
    return Ratio(step, ref_step / step, (q1, q3), cpu_us, extra, ref_step / (ref_step + extra))


def report_speed(args: argparse.Namespace, results: dict[int, dict[str, Any]]) -> None:
    timed_n = [n for n, r in results.items() if "speed" in r]
    print(f"(2) speed, {args.steps} steps per fit, median of {args.reps} runs interleaved after a warm-up (rank 0's "
          "clocks); hand-written = new group + DeviceMesh + fully_shard per block and root + AdamW + loop;")
    print("    distloop = trainer.fit(), Trainer(strategy=FSDPStrategy(shard_modules=[Block])) built before the clock; "
          "both end with the same weights (checked after the warm-up)")
    print("    paired = hand-written's time / distloop's in the same repetition, quartiles; CPU = the rank's main "
          "thread; CPU-based = hand-written's step time / (that + distloop's extra CPU)")
    if not timed_n:
        print("    (not run: no world size in --time-ranks)")
        return
    print(f"{'ranks':>5}  {'timed':<11}{'loop':<20}{'steps/s':>8}{'vs hand-written':>17}{'paired':>12}"
          f"{'CPU us/step':>13}{'extra CPU':>11}{'CPU-based':>11}   bar >= {MIN_SPEED_RATIO}: measured, CPU-based")
    for n in timed_n:
        runs = results[n]["speed"]
        for timed_what, wall, cpu in (("whole fit", "wall", "cpu"), ("loop alone", "loop_wall", "loop_cpu")):
            for name in (HAND, DISTLOOP):
                r = ratio(args.steps, runs[HAND], runs[name], wall, cpu)
                bar = (f"{verdict(r.measured >= MIN_SPEED_RATIO)}, {verdict(r.cpu_based >= MIN_SPEED_RATIO)}"
                       if name == DISTLOOP else "")
                print(f"{n:>5}  {timed_what:<11}{name:<20}{1e6 / r.step_us:>8.2f}{r.measured:>17.3f}"
                      f"{f'{r.paired[0]:.2f}-{r.paired[1]:.2f}':>12}{r.cpu_us:>13.0f}{r.extra_cpu_us:>+11.0f}"
                      f"{r.cpu_based:>11.3f}   {bar}")
    skipped = [n for n in results if n not in timed_n]
    if skipped:
        print(f"    not timed: {', '.join(map(str, skipped))} ranks (more ranks than this machine's "
              f"{'GPUs' if results[skipped[0]]['device'] == 'cuda' else 'cores'}; --time-ranks to time them anyway)")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})" if values else "-"


def report_checkpoints(args: argparse.Namespace, results: dict[int, dict[str, Any]]) -> None:
    timed_n = [n for n, r in results.items() if "checkpoint" in r]
    print(f"(3) checkpoint: ms training is blocked by trainer.save_checkpoint(path, blocking=...), timed on every rank "
          f"from a barrier, the slowest rank's; median (min-max) of {args.ckpt_reps} interleaved saves")
    print("    after a first, untimed pair; 'written' = until the background write was complete (then=, rank 0); "
          "before each save the previous write is waited for (wait_for_checkpoints) and deleted;")
    print("    the full row runs first in its processes: after an earlier FSDP fit, torch 2.13 fails to gather "
          "(\"Could not resolve the process group registered under the name 1\")")
    if not timed_n:
        print("    (not run: no world size in --time-ranks)")
        return
    print(f"{'ranks':>5}  {'strategy':<25}{'on disk':>17}{ASYNC + ' ms':>20}{BLOCKING + ' ms':>20}{'written ms':>16}"
          f"{'async/blocking':>16}   bar <= {MAX_ASYNC_RATIO} (sharded default)")
    notes: list[str] = []
    for n in timed_n:
        for row in (SHARDED, FULL, DDP_FILE):
            r = results[n]["checkpoint"][row]
            if r["note"]:
                notes.append(f"{n} ranks, {row}: {r['note']}")
            if "saves" not in r:
                status = f"failed: {r['error']}" if "error" in r else "n/a (see below)"
                print(f"{n:>5}  {row:<25}{status}")
                continue
            timed_saves = r["saves"][2:]  # the first pair warms up
            blocked = {m: [s["blocked"] * 1e3 for s in timed_saves if s["method"] == m] for m in (ASYNC, BLOCKING)}
            written = [s["written"] * 1e3 for s in timed_saves if s["method"] == ASYNC and s["written"] is not None]
            size = next((s for s in r["saves"] if "bytes" in s), None)
            on_disk = f"{size['bytes'] / 1e6:.1f} MB, {size['files']} file{'s' if size['files'] > 1 else ''}" \
                if size else "?"
            share = statistics.median(blocked[ASYNC]) / statistics.median(blocked[BLOCKING])
            bar = f"{verdict(share <= MAX_ASYNC_RATIO)}" if row == SHARDED else ""
            print(f"{n:>5}  {row:<25}{on_disk:>17}{spread(blocked[ASYNC]):>20}{spread(blocked[BLOCKING]):>20}"
                  f"{spread(written):>16}{share:>16.2f}   {bar}")
        firsts = {row: [f"{s['method']} {s['blocked'] * 1e3:.0f}" for s in r["saves"][:2]]
                  for row, r in results[n]["checkpoint"].items() if "saves" in r}
        print(f"    {n} ranks, first (untimed) saves, ms blocked: "
              + "; ".join(f"{row}: {', '.join(v)}" for row, v in firsts.items()))
    for note in notes:
        print(f"    {note}")


def utc_now() -> str:
    """As ``date -u`` prints it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%a %b %e %H:%M:%S UTC %Y")


def report(args: argparse.Namespace, results: dict[int, dict[str, Any]], started: str) -> None:
    devices = sorted({r["device"] for r in results.values()})
    params = args.blocks * (args.dim * args.dim + args.dim)
    print(f"distloop FSDP benchmark, {started}")
    print(f"machine: {platform.platform()}, {cpu_model()}, {len(os.sched_getaffinity(0))} cores (nproc), python "
          f"{platform.python_version()}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if "cuda" in devices else ""))
    os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # code_version's `git status` must not take the index lock
    print(f"code:    {code_version()}")
    backends = ", ".join("gloo, CPU" if d == "cpu" else "NCCL, CUDA" for d in devices)
    print(f"run:     ranks {', '.join(map(str, results))} ({backends}), "
          f"1 thread per rank; Sequential({args.blocks} x Block(Linear({args.dim}, {args.dim}), ReLU)), "
          f"{params / 1e6:.2f}M float32 parameters; MSE, AdamW(lr={LR}); batch {args.batch} per rank;")
    print(f"         distloop: FSDPStrategy(shard_modules=[Block]) (fully_shard per Block, then the root) and "
          f"DDPStrategy(); no metrics logged; timed world sizes: {', '.join(map(str, args.time_ranks)) or 'none'}\n")
    report_memory(results)
    print()
    report_speed(args, results)
    print()
    report_checkpoints(args, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes to run")
    parser.add_argument("--steps", type=int, default=20, help="(2) training steps per fit (per rank)")
    parser.add_argument("--reps", type=int, default=10, help="(2) timed runs per loop")
    parser.add_argument("--ckpt-reps", type=int, default=3, help="(3) timed saves per method")
    parser.add_argument("--batch", type=int, default=32, help="batch size per rank")
    parser.add_argument("--dim", type=int, default=512, help="width of each Linear layer")
    parser.add_argument("--blocks", type=int, default=8, help="number of (Linear, ReLU) blocks")
    parser.add_argument("--time-ranks", type=int, nargs="*", default=None,
                        help="world sizes for (2) and (3) (default: those of --ranks that fit the cores, or GPUs)")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: the system's temp dir)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer steps and repetitions ({', '.join(f'{k}={v}' for k, v in QUICK.items())}): ~30 s")
    parser.add_argument("--json", default=None, help="also write every measurement, raw, to this file")
    parser.add_argument("--deadline", type=float, default=600.0,
                        help="seconds before one world size's ranks are killed")
    args = parser.parse_args()
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, min(getattr(args, name), value))
    if args.steps < max(MEMORY_STEPS, WARMUP_STEPS + 1):
        parser.error(f"--steps must be at least {max(MEMORY_STEPS, WARMUP_STEPS + 1)}")
    if args.time_ranks is None:
        fits = [n for n in args.ranks
                if (torch.cuda.device_count() if uses_cuda(n) else len(os.sched_getaffinity(0))) >= n]
        args.time_ranks = fits or [min(args.ranks)]
    started, start, busy, own = utc_now(), time.monotonic(), machine_cpu_seconds(), own_cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="distloop-fsdp-bench-", dir=args.dir) as root:
        results = {n: run_ranks(n, args, root) for n in args.ranks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    report(args, results, started)
    others = max(0.0, (machine_cpu_seconds() - busy) - (own_cpu_seconds() - own))
    print(f"\nother processes used {others / (time.monotonic() - start):.2f} of the {os.cpu_count()} cores "
          f"on average during this run ({time.monotonic() - start:.0f} s; they share the cores with the ranks)")


if __name__ == "__main__":
    main()
