"""Run a function on N gloo ranks in spawned processes, with a deadline on everything."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distloop.strategies.ddp import free_port

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def gloo_reduce(tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
    """A minimal sync function over the default gloo group."""
    out = tensor.clone()
    dist.all_reduce(out, op=_OPS[reduce_op])
    if reduce_op == "mean":
        out = out / dist.get_world_size()
    return out


def _entry(rank: int, fn: Callable, world_size: int, port: int, pg_timeout: float, init: bool, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if not init:  # the code under test makes the process group
        fn(rank, world_size, *args)
        return
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any, timeout: float = 90, pg_timeout: float = 30,
          init: bool = True) -> None:
    """Run ``fn(rank, world_size, *args)`` on each rank; re-raise the first failure.

    With ``init=False`` the ranks get torchrun's environment but no process group.
    """
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), pg_timeout, init, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"ranks did not finish within {timeout}s")
