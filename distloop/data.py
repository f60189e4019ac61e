"""Resumable, distributed sampling, and how many batches a stage reads.

The data position is a global sample offset within an epoch: every rank draws the same
permutation of the dataset (from ``seed + epoch``), skips the first ``offset`` samples
(those already trained on, across all ranks), and takes every ``num_replicas``-th of the
rest. A run saved on N ranks can thus resume on M ranks with
no sample of the epoch skipped or repeated, and resuming never replays the loader.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from distloop.errors import MisconfigurationError
from distloop.rng import seeding_workers, worker_init_function


class ResumableSampler(Sampler[int]):
    """``pad=True`` (training) repeats a few samples so every rank gets as many batches;
    ``pad=False`` (evaluation) gives uneven shards so each sample is counted once."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, pad: bool = True) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.offset = 0

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Start ``epoch`` at global sample ``offset`` (0 for a fresh epoch)."""
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset {offset} is outside the epoch's {self.num_samples} samples")
        self.epoch = epoch
        self.offset = offset

    def _remaining(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        remaining = order[self.offset:]
        if self.pad and remaining:
            # Pad from the epoch's first samples, as the whole epoch pads: a run resumed in the
            # epoch's last batches then repeats the same samples an uninterrupted one does.
            total = math.ceil(len(remaining) / self.num_replicas) * self.num_replicas
            while len(remaining) < total:
                remaining += order[: total - len(remaining)]
        return remaining

    def __iter__(self) -> Iterator[int]:
        return iter(self._remaining()[self.rank:: self.num_replicas])

    def __len__(self) -> int:
        left = self.num_samples - self.offset
        if self.pad:
            return math.ceil(left / self.num_replicas)
        return len(range(self.rank, left, self.num_replicas))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"], state["offset"])


def prepare_loader(loader: Any, *, num_replicas: int, rank: int, seed: int, train: bool) -> Any:
    """``loader`` as a stage reads it: training data always gets a resumable sampler (it makes
    resume exact); evaluation data only when several ranks must shard it."""
    if not train and num_replicas == 1:
        return loader
    return with_resumable_sampler(loader, num_replicas=num_replicas, rank=rank, seed=seed, train=train)


def with_resumable_sampler(loader: Any, *, num_replicas: int, rank: int, seed: int, train: bool) -> Any:
    """``loader`` with a ``ResumableSampler`` in place of its sampler, where that can be done.

    A plain ``torch.utils.data.DataLoader`` over a map-style dataset is rebuilt with the
    same arguments. Other iterables and iterable-style datasets are returned as they are:
    they must shard themselves across ranks.
    """
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    if isinstance(loader.sampler, ResumableSampler):
        return loader
    if loader.batch_size is None or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        if num_replicas > 1:
            raise MisconfigurationError(
                "This DataLoader has a custom sampler or batch_sampler, which distloop cannot shard across "
                f"{num_replicas} ranks: use `shuffle=True/False` with `batch_size`, or shard the data yourself "
                "in an IterableDataset.")
        return loader
    sampler = ResumableSampler(len(loader.dataset), num_replicas, rank,
                               shuffle=isinstance(loader.sampler, RandomSampler), seed=seed, pad=train)
    # Each epoch's iterator draws its workers' base seed from this generator; with the
    # global one, starting an iterator would shift the main random stream, and a run
    # resumed mid-epoch (which starts one more iterator) would not match an uninterrupted one.
    generator = loader.generator if loader.generator is not None else torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device,
    )


def seed_workers(loader: Any, rank: int) -> Any:
    """``loader``, its workers seeded by ``rng.worker_init_function`` when ``seed_everything(workers=True)``
    asked for it and the loader has no ``worker_init_fn`` of its own (Lightning's rule)."""
    if seeding_workers() and isinstance(loader, DataLoader) and loader.worker_init_fn is None:
        loader.worker_init_fn = functools.partial(worker_init_function, rank=rank)
    return loader


def resumes_mid_epoch(loader: Any) -> bool:
    """Whether ``loader`` can start an epoch past the samples already trained on (a ``ResumableSampler``)."""
    return isinstance(getattr(loader, "sampler", None), ResumableSampler)


def set_epoch(loader: Any, epoch: int, samples_seen: int = 0) -> None:
    """Point ``loader``'s sampler at ``epoch``, past the ``samples_seen`` (global) already trained on.

    A ``ResumableSampler`` starts at that offset; otherwise the first ``set_epoch`` found
    (sampler, batch sampler, the loader itself) is told the epoch, as ``DistributedSampler``
    expects.
    """
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, min(samples_seen, sampler.num_samples))
        if isinstance(loader, DataLoader) and loader.generator is not None:
            # The epoch's workers take their base seed from this generator: a function of
            # (seed, rank, epoch), so a run resumed in a later epoch seeds them as an uninterrupted one.
            loader.generator.manual_seed(hash((sampler.seed, sampler.rank, epoch)) & (2**63 - 1))
        return
    for holder in (sampler, getattr(loader, "batch_sampler", None), loader):
        if holder is not None and hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)
            return


def num_batches(loader: Any, limit: int | float, what: str) -> float:
    """How many batches of ``loader`` a stage runs under ``limit_<what>_batches`` (inf: no length)."""
    try:
        n: float = len(loader)
    except TypeError:
        n = math.inf
    if isinstance(limit, int):
        return min(n, limit)
    if math.isinf(n):
        if limit not in (0.0, 1.0):
            raise MisconfigurationError(
                f"limit_{what}_batches={limit} is a fraction, but the {what} data has no length: pass an int.")
        return 0 if limit == 0.0 else n
    return int(n * limit) if limit < 1.0 else n
