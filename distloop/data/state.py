"""The training data's part of a checkpoint (``data``): what the data was, and where each rank stood.

- ``fingerprint``: of the training data, so a resume on other data refuses instead of
  silently skipping or repeating samples (``Trainer(resume_with_other_data=True)`` overrides);
- ``order``: the state a user's stateful sampler had at the epoch's start and end, the same
  on every rank (the position itself, ``samples_seen``, is the epoch loop's);
- ``loaders``: for a loader that keeps its own position (``state_dict`` / ``load_state_dict``),
  every rank's state, with the ``world_size`` they were saved on.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from distloop.checkpoint import CheckpointError
from distloop.data.position import position_keeper, is_stateful
from distloop.data.sharded import ShardedIterable


def fingerprint(loader: Any) -> str:
    """A cheap digest of a training loader's data (a ``ShardedIterable``'s source): the dataset's
    own ``fingerprint()`` when it defines one; else its type and length, plus, for tensors, their
    shapes and an evenly spaced sample of their values, and a ``Subset``'s indices. A loader of
    your own is known by its ``dataset`` attribute, else by its type only (its length may
    depend on the world size)."""
    digest = hashlib.blake2b(digest_size=12)
    data = getattr(loader, "dataset", None)
    if data is None:
        digest.update(f"{type(loader).__module__}.{type(loader).__qualname__}".encode())
        return digest.hexdigest()
    if isinstance(data, ShardedIterable):
        data = data.source
    _digest_into(digest, data)
    return digest.hexdigest()


def _digest_into(digest: Any, data: Any) -> None:
    digest.update(f"{type(data).__module__}.{type(data).__qualname__}".encode())
    own = getattr(data, "fingerprint", None)
    if callable(own):
        digest.update(repr(own()).encode())
        return
    try:
        digest.update(f"/len={len(data)}".encode())
    except TypeError:
        pass
    if isinstance(data, TensorDataset):
        for tensor in data.tensors:
            _digest_tensor(digest, tensor)
    elif isinstance(data, Subset):
        digest.update(repr(list(data.indices)).encode())
        _digest_into(digest, data.dataset)
    elif isinstance(data, ConcatDataset):
        for part in data.datasets:
            _digest_into(digest, part)
    elif isinstance(data, torch.Tensor):
        _digest_tensor(digest, data)


def _digest_tensor(digest: Any, tensor: torch.Tensor, samples: int = 4096) -> None:
    digest.update(f"{tuple(tensor.shape)}/{tensor.dtype}".encode())
    flat = tensor.detach().reshape(-1)
    if flat.numel():
        picks = torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()
        digest.update(flat[picks].cpu().contiguous().view(torch.uint8).numpy().tobytes())


class DataState:
    """The ``data`` part of a Trainer's checkpoint, for its training loader."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._fingerprints: dict[int, str] = {}  # per loader object: computed once per fit

    def _fingerprint(self, loader: Any) -> str:
        key = id(loader)
        if key not in self._fingerprints:
            self._fingerprints = {key: fingerprint(loader)}
        return self._fingerprints[key]

    def state_dict(self) -> dict[str, Any]:
        """Call it on every rank: a stateful loader's states are gathered (a collective)."""
        trainer = self.trainer
        loader = trainer.train_dataloader
        if loader is None:
            return {}
        state: dict[str, Any] = {"world_size": trainer.world_size, "fingerprint": self._fingerprint(loader)}
        keeper = position_keeper(loader)
        if keeper is not None and hasattr(keeper, "state_dict"):
            state["order"] = keeper.state_dict()
        if is_stateful(loader):
            state["loaders"] = trainer.strategy.gather_object(trainer.fit_loop.epoch_loop.loader_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainer = self.trainer
        loader = trainer.train_dataloader
        if loader is None or not state:
            return
        saved, current = state.get("fingerprint"), self._fingerprint(loader)
        if saved is not None and saved != current and not trainer.resume_with_other_data:
            raise CheckpointError(
                f"{trainer.ckpt_path} was saved while training on other data (fingerprint {saved}, now {current}): "
                "resuming would skip or repeat samples. Train on the data it was saved with, or pass "
                "Trainer(resume_with_other_data=True) (trainer.resume_with_other_data=true) to resume at its "
                "position anyway.")
        keeper = position_keeper(loader)
        if state.get("order") is not None and keeper is not None and hasattr(keeper, "load_state_dict"):
            keeper.load_state_dict(state["order"])
        if state.get("loaders") is not None and is_stateful(loader):
            _load_loader(loader, state["loaders"], state["world_size"], trainer)


def _load_loader(loader: Any, states: list[Any], saved_world_size: int, trainer: Any) -> None:
    """Each rank's loader state back on its rank; on another world size only through the loader's
    ``load_resharded_state_dict(states, rank, world_size)``, which gets every saved rank's state."""
    rank, world_size = trainer.global_rank, trainer.world_size
    if saved_world_size == world_size:
        loader.load_state_dict(states[rank])
    elif callable(getattr(loader, "load_resharded_state_dict", None)):
        loader.load_resharded_state_dict(states, rank, world_size)
    else:
        raise CheckpointError(
            f"{trainer.ckpt_path} holds the positions of a {type(loader).__name__} on {saved_world_size} ranks, and "
            f"this run has {world_size}: a loader that keeps its own state cannot be moved to another world size "
            "unless it defines load_resharded_state_dict(states, rank, world_size). Resume on "
            f"{saved_world_size} ranks, or use a DataLoader distloop positions (a map-style dataset, or a "
            "distloop.data.ShardedIterable), which resumes on any world size.")
