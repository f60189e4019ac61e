"""FSDP2: parameters, gradients and optimizer state sharded over the ranks with ``fully_shard``.

The process group, the launcher's environment and every collective are DDP's (this class
extends ``DDPStrategy``); what differs is the module: sharded over a 1-D ``DeviceMesh``
of the training group, submodules bottom-up and the root last, with the module's step
methods registered as FSDP forward methods, so ``training_step`` gathers the parameters it
uses the way ``forward`` does. FSDP reduce-scatters the gradients in backward, so manual
optimization needs nothing of its own.

Checkpoints (``state_dict_type="sharded"``, the default) are directories: every rank
writes its own shards with ``torch.distributed.checkpoint``, nothing is gathered, and by
default training waits only while its shards are copied; the write runs on the checkpoint
writer thread over a gloo group of its own, never the training group (a collective on the
main thread and one on the writer must not share a group). ``"full"`` gathers full state
dicts onto rank zero and writes the single file the other strategies write. Either kind
resumes on any number of ranks, under DDP or on one device, and a DDP checkpoint
continues here: loading reads full tensors and each rank keeps its shard.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.optim import Optimizer

from distloop.checkpoint import split_sharded, stage_sharded, write_sharded
from distloop.errors import MisconfigurationError
from distloop.optim import optimizer_state_by_index, optimizer_state_by_name
from distloop.strategies.ddp import DDPStrategy
from distloop.strategies.strategy import Strategy, training_step_of

# The module's methods that run its layers: each must gather the sharded parameters first.
_STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # the full state, on rank zero's CPU
_FULL = StateDictOptions(full_state_dict=True)  # a full state on every rank, each keeping its shard
STATE_DICT_TYPES = ("sharded", "full")


class FSDPStrategy(DDPStrategy):
    def __init__(
        self,
        accelerator: str = "auto",
        precision: Any = "32",
        backend: str | None = None,
        timeout_s: float = 1800.0,
        shard_modules: Sequence[type[nn.Module] | str] | None = None,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        sync_every_micro_batch: bool = True,
        state_dict_type: str = "sharded",
    ) -> None:
        """``shard_modules``: the classes (or their import paths) to shard on their own, e.g.
        ``[nn.TransformerEncoderLayer]``; by default each direct child of the module that holds
        parameters. ``sync_every_micro_batch=False`` skips the reduce-scatter until the last
        micro-batch of ``accumulate_grad_batches``: less communication, but every rank then
        holds unsharded gradients while it accumulates. ``state_dict_type``: ``"sharded"``
        checkpoints are directories of every rank's shards; ``"full"`` ones, single files
        gathered on rank zero (the model must fit in its CPU memory)."""
        super().__init__(accelerator, precision, backend, timeout_s)
        if self.precision.precision == "16-mixed":
            raise MisconfigurationError("strategy='fsdp' does not support precision='16-mixed' (its grad scaler "
                                        "does not work on sharded gradients): use precision='bf16-mixed'.")
        if cpu_offload and self.root_device.type != "cuda":
            raise MisconfigurationError("FSDPStrategy(cpu_offload=True) moves parameters from the GPU to the CPU; "
                                        "this run trains on the CPU already. Leave cpu_offload off.")
        if state_dict_type not in STATE_DICT_TYPES:
            raise MisconfigurationError(f"FSDPStrategy(state_dict_type={state_dict_type!r}): use one of "
                                        f"{STATE_DICT_TYPES}.")
        self.state_dict_type = state_dict_type
        self.shard_modules = tuple(_module_class(c) for c in shard_modules) if shard_modules else None
        self.reshard_after_forward = reshard_after_forward
        self.cpu_offload = cpu_offload
        self.sync_every_micro_batch = sync_every_micro_batch
        self.mesh: DeviceMesh | None = None
        self._checkpoint_group: Any = None  # the sharded writes' own gloo group
        self._checkpoint_mesh: DeviceMesh | None = None  # its ranks, for the shards staged on the CPU

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.state_dict_type == "sharded" and self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo", timeout=self.timeout)
            self._checkpoint_mesh = DeviceMesh.from_group(self._checkpoint_group, "cpu")

    def teardown(self) -> None:
        # DDP's teardown finishes the background writes (they use the checkpoint group) first.
        group, self._checkpoint_group, self._checkpoint_mesh = self._checkpoint_group, None, None
        owns_default = self._owns_default_group
        super().teardown()
        if group is not None and not owns_default and dist.is_initialized():
            dist.destroy_process_group(group)

    # --------------------------------------------------------------- set-up
    def setup_module(self, module: nn.Module) -> nn.Module:
        self.module = module.to(self.root_device)
        self.mesh = DeviceMesh.from_group(self.group, self.root_device.type)
        options: dict[str, Any] = {"mesh": self.mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.precision.precision == "bf16-mixed":
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        if not isinstance(module, FSDPModule):  # the user's configure_model may have sharded it all
            user_sharded = any(isinstance(m, FSDPModule) for m in module.modules())
            if not user_sharded:
                for part in self._parts_to_shard(module):
                    fully_shard(part, **options)
            fully_shard(module, **options)
        for name in _STEP_METHODS:
            step = getattr(module, name, None)
            if callable(step):
                register_fsdp_forward_method(module, name)
                # FSDP's wrapper hides the step's signature, which says whether it takes batch_idx.
                functools.update_wrapper(getattr(module, name).__func__, step.__func__)
        self._training_step = training_step_of(module)
        return module

    def _parts_to_shard(self, module: nn.Module) -> list[nn.Module]:
        """Bottom-up: the submodules of ``shard_modules``, or the direct children holding parameters."""
        if self.shard_modules is None:
            return [c for c in module.children() if any(True for _ in c.parameters())]
        return [m for m in reversed(list(module.modules())) if m is not module and isinstance(m, self.shard_modules)]

    # --------------------------------------------------------------- per step
    def no_backward_sync(self, accumulating: bool) -> ContextManager:
        if accumulating and not self.sync_every_micro_batch:
            return self._gradient_sync_off()
        return Strategy.no_backward_sync(self, accumulating)

    @contextlib.contextmanager
    def _gradient_sync_off(self) -> Iterator[None]:
        assert isinstance(self.module, FSDPModule)
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def evaluation_context(self, inference_mode: bool) -> ContextManager:
        """``no_grad`` always, as in Lightning's FSDP: FSDP's gathered parameters outlive an
        evaluation, and tensors made under ``inference_mode`` cannot be updated after it."""
        return torch.no_grad()

    def evaluation_steps_to_pad(self, batches: float | None) -> int:
        """Every forward all-gathers parameters, so every rank must run as many evaluation steps
        as the rank with the most batches (evaluation data is split without padding, so that
        metrics count each sample once). Data without a length cannot be counted: 0."""
        mine = torch.tensor([-1.0 if batches is None else float(batches)], device=self.root_device)
        most, fewest = float(self.reduce(mine, "max")), float(self.reduce(mine, "min"))
        if fewest < 0:
            return 0
        if mine.item() == 0 and most > 0:
            raise MisconfigurationError(
                f"strategy='fsdp': rank {self.global_rank} has no evaluation batch while another has "
                f"{int(most)}; every forward is a collective, so each rank needs at least one. Use fewer ranks "
                "or more evaluation data.")
        return int(most - mine.item())

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward: FSDP's hooks reduce-scatter (average) the gradients."""
        Strategy.manual_backward(self, loss, *args, **kwargs)

    # --------------------------------------------------------------- checkpoint state
    def module_state_dict(self) -> dict[str, Tensor]:
        """Sharded: this rank's shards (DTensors). Full: the full state dict on global rank zero,
        empty elsewhere (a collective)."""
        assert self.module is not None
        if self.state_dict_type == "sharded":  # FSDP2's own: DTensors under the plain names
            return self.module.state_dict()
        return get_model_state_dict(self.module, options=_GATHER)

    def load_module_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """A full state dict (every rank has read it) into the shards: each rank keeps its own part."""
        assert self.module is not None
        set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True, strict=strict))

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Keyed by parameter index as ``Optimizer.state_dict`` keys it (what the other strategies
        save and load). Sharded: this rank's shards; full: the full state on global rank zero."""
        assert self.module is not None
        if self.state_dict_type == "sharded":  # the optimizer's own: its states are DTensors, like its parameters
            return optimizer.state_dict()
        state = get_optimizer_state_dict(self.module, optimizer, options=_GATHER)
        return optimizer_state_by_index(state, self._names(optimizer)) if self.is_global_zero else {}

    def load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        assert self.module is not None
        set_optimizer_state_dict(self.module, optimizer, optimizer_state_by_name(state, self._names(optimizer)),
                                 options=_FULL)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, blocking: bool = True,
                        then: Callable[[str], None] | None = None) -> None:
        """Sharded: the directory ``path``, every rank writing its shards (see the module's doc);
        with ``blocking=False`` this returns once they are copied. Full: the single file."""
        if self.state_dict_type == "full":
            super().save_checkpoint(checkpoint, path, blocking, then)
            return
        save = split_sharded(checkpoint, keep_skeleton=self.is_global_zero)
        then = then if self.is_global_zero else None
        self.checkpoint_writer.join()  # the previous save first: one staged copy at a time
        if not blocking:
            self.checkpoint_writer.run(functools.partial(write_sharded, stage_sharded(save), path,
                                                         self._checkpoint_group, then, self._checkpoint_mesh))
            return
        # Every rank writes, whatever its previous background write did, so that the ranks'
        # collectives pair up; then all agree, and an earlier failure is raised with the rest.
        error: BaseException | None = self.checkpoint_writer.take_error()
        try:
            write_sharded(save, path, self._checkpoint_group, then)
        except Exception as err:  # noqa: BLE001 - every rank raises below, none waits for another
            error = error or err
        self.agree_on_write(error, f"Another rank could not write its part of checkpoint {path}; its error says why.")

    def _names(self, optimizer: Optimizer) -> list[str]:
        """The parameter names in ``optimizer``'s order (a parameter's index in its state dict)."""
        assert self.module is not None
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _module_class(entry: type[nn.Module] | str) -> type[nn.Module]:
    """A module class, or one named by its import path (``torch.nn.TransformerEncoderLayer``) in a config."""
    if isinstance(entry, type) and issubclass(entry, nn.Module):
        return entry
    if isinstance(entry, str) and "." in entry:
        where, _, name = entry.rpartition(".")
        try:
            found = getattr(importlib.import_module(where), name)
        except (ImportError, AttributeError) as err:
            raise MisconfigurationError(f"FSDPStrategy(shard_modules=...): cannot import {entry!r}: {err}") from err
        if isinstance(found, type) and issubclass(found, nn.Module):
            return found
    raise MisconfigurationError(f"FSDPStrategy(shard_modules=...): {entry!r} is not an nn.Module class or the "
                                "import path of one (e.g. 'torch.nn.TransformerEncoderLayer').")
