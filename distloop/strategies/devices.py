"""Which devices and process-group backend a run uses, and the rules that refuse one that cannot work.

The `distloop` command (before any process starts), ``resolve_strategy`` and ``DDPStrategy``
all check with these functions, so each rule is written once and says the same everywhere.
Their messages say what to change, spelled as the user wrote it: ``config=True`` when the
values came from Hydra config keys (``strategy.accelerator=cpu``), otherwise as Python
arguments (``accelerator='cpu'``).
"""

from __future__ import annotations

from typing import Any

import torch

from distloop.errors import MisconfigurationError

ACCELERATORS = ("auto", "cpu", "cuda", "gpu")
STRATEGIES = ("auto", "single_device", "ddp", "ddp_find_unused_parameters_true", "fsdp")


def _key(name: str, config: bool) -> str:
    return f"strategy.{name}" if config else name


def _setting(name: str, value: Any, config: bool) -> str:
    """``name=value`` as the user types it: a Hydra override, or a Python keyword argument."""
    return f"strategy.{name}={value}" if config else f"{name}={value!r}"


def check_accelerator(accelerator: Any, *, config: bool = False) -> None:
    """A misspelt accelerator is an error, never a quiet fall-back to the CPU."""
    if accelerator not in ACCELERATORS:
        raise MisconfigurationError(
            f"{_key('accelerator', config)}={accelerator!r} is not known: use one of {ACCELERATORS}.")


def check_strategy(name: Any, *, config: bool = False) -> None:
    """Only the strategies that exist can be named (the config key is ``strategy.name``)."""
    if name not in STRATEGIES:
        key = "strategy.name" if config else "strategy"
        raise MisconfigurationError(f"{key}={name!r} is not known: use one of {STRATEGIES}.")


def uses_cuda(accelerator: Any, *, config: bool = False) -> bool:
    """Whether ``accelerator`` runs on CUDA: ``cuda`` / ``gpu`` always, ``auto`` when this machine has it.

    Asking for CUDA where there is none is an error: training on the CPU instead would be
    silently, and vastly, slower than the user meant.
    """
    check_accelerator(accelerator, config=config)
    if accelerator in ("cuda", "gpu"):
        if not torch.cuda.is_available():
            raise MisconfigurationError(
                f"{_setting('accelerator', accelerator, config)} needs CUDA, which this machine lacks: "
                f"use {_setting('accelerator', 'cpu', config)}.")
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def check_backend(backend: str | None, use_cuda: bool, *, config: bool = False) -> str:
    """The process-group backend to use: ``backend`` if set, else NCCL on CUDA and gloo on CPU.

    NCCL only moves CUDA tensors, so NCCL on a run without CUDA devices is refused.
    """
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        why = ("which this machine lacks" if not torch.cuda.is_available()
               else f"but this run uses the CPU ({_setting('accelerator', 'cpu', config)})")
        raise MisconfigurationError(
            f"{_setting('backend', 'nccl', config)} needs CUDA, {why}: use {_setting('backend', 'gloo', config)} "
            f"(or leave it {'null' if config else 'None'}).")
    return backend


def check_processes_per_node(processes: int, setting: str) -> None:
    """One process per GPU: ``processes`` CUDA ranks on one node need that many devices.

    Two ranks sharing a device would fight over its memory, and NCCL refuses them outright.
    ``setting`` names what asked for them, as the user would change it, e.g.
    ``launcher.nproc_per_node=4`` before launch or ``LOCAL_RANK=3`` in a started rank.
    """
    available = torch.cuda.device_count()
    if processes > available:
        raise MisconfigurationError(
            f"{setting} but this node has {available} CUDA devices: start at most one process per GPU.")


def cuda_device(local_rank: int) -> torch.device:
    """The CUDA device of the rank with this ``LOCAL_RANK``: one device per local rank."""
    check_processes_per_node(local_rank + 1, f"LOCAL_RANK={local_rank}")
    return torch.device("cuda", local_rank)


def check_one_process(strategy: Any, world_size: int, *, config: bool = False) -> None:
    """``single_device`` runs one process: more would each train a model of their own, unsynchronised."""
    if strategy != "single_device" or world_size <= 1:
        return
    if config:
        raise MisconfigurationError(f"strategy={strategy} runs one process, but the launcher starts {world_size}: "
                                    "use strategy=ddp (or fsdp).")
    raise MisconfigurationError(f"strategy={strategy!r} runs one process, but WORLD_SIZE={world_size}: "
                                "use strategy='ddp', 'fsdp' or 'auto'.")
