"""DDP: one process per device, gradients all-reduced by DistributedDataParallel.

Under manual optimization the module is not wrapped: the strategy does what DDP would, with
public collectives only. Parameters and buffers are broadcast from rank 0 at set-up,
buffers again before every training step (DDP's ``broadcast_buffers``), and every
``manual_backward`` averages the gradients of the parameters that require grad (one flat
all-reduce, DDP's numbers). So toggled optimizers (a GAN) need no ``find_unused_parameters``,
and the gradients the hooks, ``clip_gradients`` and ``step`` see are averaged, as with DDP.

The process group comes from the launcher's environment (torchrun, or SLURM's srun):
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. NCCL on CUDA,
gloo on CPU, unless ``backend`` says otherwise.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist
# Imported before any group exists: its functions take ``group=group.WORLD`` as a default, so
# DDP's lazy import of it after ``init_process_group`` would pin the default group for the
# life of the process, and with it gloo's threads, which then race interpreter exit and abort
# it ("terminate called without an active exception") when they free a tensor after the GIL
# is gone.
import torch.distributed.nn.functional  # noqa: F401
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from distloop.errors import MisconfigurationError
from distloop.strategies.devices import check_backend, cuda_device, uses_cuda
from distloop.strategies.strategy import Strategy, training_step_of

T = TypeVar("T")

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def distributed_env() -> tuple[int, int, int]:
    """``(global_rank, local_rank, world_size)`` from torchrun's variables, or SLURM's under plain srun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", "0")), int(os.environ["SLURM_NTASKS"])
    return 0, 0, 1


_groups_made = 0  # default groups this process has made: part of each one's key prefix


def init_default_group(backend: str, rank: int, world_size: int, timeout: timedelta,
                       device_id: torch.device | None = None) -> None:
    """``init_process_group`` from the launcher's environment, safe to repeat and to restart.

    Each group's keys go under a prefix naming the torchrun attempt and how many groups this
    process has made: torchrun keeps one store across restarts, and ``fit`` then ``test``
    make a group each, so a rank must never read a peer address left by an earlier group.
    """
    global _groups_made
    if "MASTER_ADDR" not in os.environ:
        if world_size > 1:
            raise MisconfigurationError(
                "MASTER_ADDR / MASTER_PORT are not set: start the ranks with `distloop "
                "launcher.nproc_per_node=N`, torchrun, or export them in your SLURM script.")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=rank,
                                world_size=world_size, timeout=timeout, device_id=device_id)
        return
    # The group owns its store and frees it when destroyed; multi_tenant lets rank 0 host the
    # next group's store on the same port while the previous server is still shutting down.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts it
    tcp_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=True)
    _groups_made += 1
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"distloop/attempt_{attempt}/group_{_groups_made}/", tcp_store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device_id)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for one-machine groups and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _TrainingStep(nn.Module):
    """Lets DDP's forward (and so its gradient hooks) run the module's ``training_step``."""

    def __init__(self, module: nn.Module, step: Callable[[Any, int], Any]) -> None:
        super().__init__()
        self.module = module
        self._step = step  # a plain attribute: no Module.__getattr__ per step

    def forward(self, batch: Any, batch_idx: int) -> Any:
        return self._step(batch, batch_idx)

    # DDP calls the module it wraps; nothing hooks this wrapper, so skip nn.Module's hook dispatch.
    __call__ = forward


def broadcast_from_zero(tensors: list[Tensor], group: Any) -> None:
    """Overwrite ``tensors`` with global rank 0's values: one flat broadcast per dtype and device."""
    with torch.no_grad():
        for same in _by_kind(tensors):
            flat = torch.cat([t.reshape(-1) for t in same])
            dist.broadcast(flat, src=0, group=group)  # the strategy's groups hold every rank
            for t, value in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(value.view_as(t))


def average_gradients(params: list[nn.Parameter], world_size: int, group: Any) -> None:
    """Average the gradients of ``params`` over the ranks in place, with DDP's numbers (each rank's
    gradient times 1/world_size, then summed): one flat all-reduce per dtype and device.

    A parameter without a gradient on this rank adds zeros; one without a gradient on every
    rank keeps none, as DDP leaves a globally unused parameter. Every rank passes the same
    parameters in the same order (the same module, toggled alike), so no rank waits alone.
    """
    with torch.no_grad():
        for same in _by_kind(params):
            grads = [p.grad for p in same]
            present = [g is not None for g in grads]
            flat = torch.cat([*(g.reshape(-1) if g is not None else torch.zeros(p.numel(), dtype=p.dtype,
                                                                               device=p.device)
                                for p, g in zip(same, grads)),
                              torch.tensor(present, dtype=same[0].dtype, device=same[0].device)])
            sizes = [p.numel() for p in same]
            total = sum(sizes)
            flat[:total].mul_(1.0 / world_size)
            dist.all_reduce(flat, group=group)
            anywhere = present if all(present) else [n > 0 for n in flat[total:].tolist()]  # host sync: rare
            for p, g, value, has in zip(same, grads, flat[:total].split(sizes), anywhere):
                if g is not None:
                    g.copy_(value.view_as(g))
                elif has:
                    p.grad = value.view_as(p).clone()


def _by_kind(tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` grouped by (dtype, device), each group in the given order: what one flat collective holds."""
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


class DDPStrategy(Strategy):
    def __init__(
        self,
        accelerator: str = "auto",
        precision: Any = "32",
        backend: str | None = None,
        timeout_s: float = 1800.0,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = True,
    ) -> None:
        self._rank, self._local_rank, self._world_size = distributed_env()
        use_cuda = uses_cuda(accelerator)
        device = cuda_device(self._local_rank) if use_cuda else torch.device("cpu")
        backend = check_backend(backend, use_cuda)
        if timeout_s <= 0:
            raise MisconfigurationError(f"strategy timeout_s={timeout_s} must be > 0 seconds.")
        super().__init__(device, precision)
        self.backend = backend
        self.timeout = timedelta(seconds=timeout_s)
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.group: Any = None
        self._gloo_group: Any = None
        self._owns_default_group = False
        self._ddp: DistributedDataParallel | None = None
        self._step: Callable[[Any, int], Any] | None = None  # manual optimization: the unwrapped step
        self._params: list[nn.Parameter] = []  # manual optimization: what manual_backward averages
        self._trainable: list[bool] = []  # which parameters required grad when DDP was built
        self._buffers: list[Tensor] = []
        self._sync_blocked = False

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def global_rank(self) -> int:
        return self._rank

    @property
    def local_rank(self) -> int:
        return self._local_rank

    # --------------------------------------------------------------- set-up
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.group is not None:
            return
        if not dist.is_initialized():
            init_default_group(self.backend, self._rank, self._world_size, self.timeout,
                               device_id=self.root_device if self.backend == "nccl" else None)
            self._owns_default_group = True
            self.group = dist.group.WORLD
        else:
            # Someone (the command, under an outer torchrun) made the default group: give
            # training its own, with this strategy's backend and timeout.
            self.group = dist.new_group(backend=self.backend, timeout=self.timeout)
        # Object collectives and the "is every rank here" check need gloo: with NCCL training,
        # a gloo group of their own (gloo tags each collective, so a rank missing from a check
        # times out there instead of being mistaken for another collective).
        self._gloo_group = self.group if self.backend == "gloo" else dist.new_group(backend="gloo", timeout=self.timeout)

    def setup_module(self, module: nn.Module) -> nn.Module:
        self.module = module.to(self.root_device)
        step = training_step_of(self.module)
        if not getattr(module, "automatic_optimization", True):
            self._ddp, self._step = None, step
            self._params, self._buffers = list(self.module.parameters()), list(self.module.buffers())
            broadcast_from_zero([*self._params, *self._buffers], self.group)  # as DDP's constructor does
            self._training_step = self._manual_training_step
            return self.module
        self._wrap(_TrainingStep(self.module, step))
        return self.module

    def _wrap(self, step: nn.Module) -> None:
        device_ids = [self.root_device.index] if self.root_device.type == "cuda" else None
        self._ddp = DistributedDataParallel(
            step, device_ids=device_ids, process_group=self.group,
            find_unused_parameters=self.find_unused_parameters, static_graph=self.static_graph,
            gradient_as_bucket_view=self.gradient_as_bucket_view)
        self._trainable = [p.requires_grad for p in step.parameters()]
        self._training_step = self._ddp

    def sync_trainable_parameters(self) -> None:
        """DDP averages only the gradients of parameters that required grad when it was built:
        after a fine-tuning callback unfreezes some, a new reducer takes them in (every rank
        changes the same parameters at the same epoch start, so all rebuild together)."""
        if self._ddp is not None and [p.requires_grad for p in self._ddp.module.parameters()] != self._trainable:
            self._wrap(self._ddp.module)

    def teardown(self) -> None:
        # Our references go first, so that destroying a group frees it and joins its threads now.
        # Owning the default group, destroying it frees every group; otherwise only ours go.
        mine = [] if self._owns_default_group else list({id(g): g for g in (self.group, self._gloo_group)
                                                         if g is not None}.values())
        super().teardown()
        self._ddp = self._step = None
        self._params, self._buffers = [], []
        self.group = self._gloo_group = None
        if dist.is_initialized() and self._owns_default_group:
            dist.destroy_process_group()
        while mine and dist.is_initialized():
            dist.destroy_process_group(mine.pop())
        self._owns_default_group = False

    # --------------------------------------------------------------- per step
    def no_backward_sync(self, accumulating: bool) -> ContextManager:
        if accumulating and self._ddp is not None:
            return self._ddp.no_sync()
        if accumulating and self._step is not None:
            return self._blocking_sync()
        return super().no_backward_sync(accumulating)

    # --------------------------------------------------------------- manual optimization
    def _manual_training_step(self, batch: Any, batch_idx: int) -> Any:
        """The step DDP's forward would run: rank 0's buffers first (``broadcast_buffers=True``)."""
        assert self._step is not None
        if self._buffers:
            broadcast_from_zero(self._buffers, self.group)
        return self._step(batch, batch_idx)

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward, then the gradients averaged over the ranks (unless inside ``no_backward_sync``)."""
        if self._step is None:
            raise MisconfigurationError(
                "manual_backward under DDP needs `self.automatic_optimization = False` before fit starts "
                "(in __init__): the strategy wrapped the module for automatic optimization at set-up.")
        super().manual_backward(loss, *args, **kwargs)
        if not self._sync_blocked:
            average_gradients([p for p in self._params if p.requires_grad], self._world_size, self.group)

    @contextlib.contextmanager
    def _blocking_sync(self) -> Iterator[None]:
        previous, self._sync_blocked = self._sync_blocked, True
        try:
            yield
        finally:
            self._sync_blocked = previous

    # --------------------------------------------------------------- collectives
    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor:
        if reduce_op not in _OPS:
            raise MisconfigurationError(f"reduce_op={reduce_op!r}: use 'mean', 'sum', 'max' or 'min'.")
        out = tensor.clone()
        dist.all_reduce(out, op=_OPS[reduce_op], group=self.group)
        if reduce_op == "mean":
            out = out / self._world_size
        return out

    def broadcast(self, obj: T, src: int = 0) -> T:
        payload = [obj]
        dist.broadcast_object_list(payload, src=src, group=self.group,
                                   device=self.root_device if self.backend == "nccl" else None)
        return payload[0]

    def barrier(self, name: str | None = None) -> None:
        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.root_device.index])
        else:
            dist.barrier(group=self.group)

    def all_gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def gather_object(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self._world_size
        dist.all_gather_object(out, obj, group=self._gloo_group)
        return out

    def check_all_ranks_here(self, what: str) -> None:
        try:
            dist.monitored_barrier(group=self._gloo_group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as err:
            raise RuntimeError(
                f"{what} is a collective: every rank must call it, but not all ranks did within "
                f"{self.timeout.total_seconds():.0f}s ({err}). Call it on every rank, not under "
                "`if trainer.is_global_zero:`.") from err

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        votes = torch.tensor(int(bool(decision)), device=self.root_device)
        total = int(self.reduce(votes, "sum").item())
        return total == self._world_size if all else total > 0

