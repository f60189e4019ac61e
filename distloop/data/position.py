"""The data position: where an epoch stands, and how each kind of training data resumes there.

The position is a global sample offset within an epoch: every rank computes the same
global order of the epoch (a permutation from ``seed + epoch``, or the order the user's
sampler gives for that epoch), skips the first ``offset`` samples (those already trained
on, across all ranks), and takes every ``num_replicas``-th of the rest. A run saved on N
ranks can thus resume on M ranks with no sample of the epoch skipped or repeated, and
resuming never replays the loader. A ``ShardedIterable`` keeps the same position over a
stream; a loader with its own ``state_dict`` keeps its own (``distloop.data.state``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, SequentialSampler

from distloop.data.randomness import SampleIndex
from distloop.data.sharded import ShardedIterable
from distloop.errors import MisconfigurationError
from distloop.rng import seeding_workers, worker_init_function

PROTOCOL = ("a sampler or batch sampler distloop shards and resumes gives the same order for the same epoch: "
            "it defines `set_epoch(epoch)`, or `state_dict()`/`load_state_dict()`, or draws from a `generator` "
            "attribute (which distloop seeds per epoch)")


def positionable(sampler: Any) -> bool:
    """Whether ``sampler``'s order per epoch can be reproduced (``PROTOCOL``)."""
    return (hasattr(sampler, "set_epoch") or hasattr(sampler, "generator")
            or (hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict")))


class _EpochOrder:
    """The global order a user's sampler (or batch sampler) gives for an epoch, reproducibly.

    A stateful sampler's state moves as it is iterated; the state before and after the
    epoch's order was drawn are kept, so a run resumed mid-epoch draws the same order and one
    resumed at the next epoch's start continues from where the order left the sampler.
    """

    def __init__(self, source: Any, seed: int) -> None:
        self.source, self.seed = source, seed
        self.epoch: int | None = None
        self.states: dict[str, Any] = {}
        self._loaded: dict[str, Any] | None = None

    def draw(self, epoch: int) -> list:
        source = self.source
        stateful = not hasattr(source, "set_epoch") and hasattr(source, "state_dict")
        if stateful and self._loaded is not None and self._loaded.get("epoch") is not None:
            saved = self._loaded
            if saved["epoch"] == epoch:
                source.load_state_dict(saved["start"])
            elif saved["epoch"] < epoch:
                source.load_state_dict(saved["end"])
        self._loaded = None
        if hasattr(source, "set_epoch"):
            source.set_epoch(epoch)
        elif not stateful and hasattr(source, "generator"):
            source.generator = torch.Generator().manual_seed(self.seed + epoch)
        start = source.state_dict() if stateful else None
        order = list(source)
        if stateful:
            self.states = {"start": start, "end": source.state_dict()}
        self.epoch = epoch
        return order

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, **self.states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state


class ResumableSampler(Sampler[int]):
    """``pad=True`` (training) repeats a few samples so every rank gets as many batches;
    ``pad=False`` (evaluation) gives uneven shards so each sample is counted once.

    ``source``: a user's sampler whose order (``PROTOCOL``) is sharded instead of a permutation.
    Training samplers (``pad=True``) yield ``SampleIndex``es, for ``sample_generator``.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, pad: bool = True, source: Sampler | None = None) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.source = _EpochOrder(source, seed) if source is not None else None
        self.epoch = 0
        self.offset = 0

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Start ``epoch`` at global sample ``offset`` (0 for a fresh epoch)."""
        if not 0 <= offset <= self.num_samples:
            raise ValueError(f"offset {offset} is outside the epoch's {self.num_samples} samples")
        self.epoch = epoch
        self.offset = offset

    def _order(self) -> list[int]:
        if self.source is not None:
            return [int(i) for i in self.source.draw(self.epoch)]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(range(self.num_samples))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        step = self.num_replicas
        positions = range(self.offset + self.rank, self.offset + step * len(self), step)
        if not self.pad:
            return iter([order[p] for p in positions])
        return self._training_indices(order, positions)

    def _training_indices(self, order: list[int], positions: range) -> Iterator[int]:
        # Pad from the epoch's first samples, as the whole epoch pads: a run resumed in the
        # epoch's last batches then repeats the same samples an uninterrupted one does. Made as
        # they are taken, so an epoch's start costs the same wherever it resumes.
        n, epoch, seed = len(order), self.epoch, self.seed
        for p in positions:
            yield SampleIndex(order[p if p < n else (p - n) % n], p, epoch, seed)

    def __len__(self) -> int:
        left = self.num_samples - self.offset
        if self.pad:
            return math.ceil(left / self.num_replicas)
        return len(range(self.rank, left, self.num_replicas))

    def state_dict(self) -> dict[str, Any]:
        """The order's source state (a stateful user sampler), the same on every rank; the offset is the loop's."""
        return {"source": self.source.state_dict() if self.source is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.source is not None and state.get("source") is not None:
            self.source.load_state_dict(state["source"])

class ResumableBatchSampler(Sampler[list]):
    """A user's batch sampler (length bucketing, say) sharded by whole batches: rank ``r`` takes
    the global batches ``r, r + num_replicas, ...`` of the epoch's order, past the first
    ``offset`` samples; the order is padded with its first batches to a multiple of the ranks.
    Batches may differ in size: the position advances by the sizes of the batches all ranks took
    (``samples_in_next_step``), the same on every rank without a collective."""

    def __init__(self, batch_sampler: Any, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.batch_sampler = batch_sampler
        self.source = _EpochOrder(batch_sampler, seed)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.offset = 0, 0
        self._drawn: tuple[int, list[list[int]]] | None = None
        self._steps = 0
        self._step_sizes: list[int] | None = None

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        self.epoch, self.offset, self._steps, self._step_sizes = epoch, offset, 0, None

    def _batches(self) -> list[list[int]]:
        if self._drawn is None or self._drawn[0] != self.epoch:
            self._drawn = (self.epoch, [[int(i) for i in b] for b in self.source.draw(self.epoch)])
        return self._drawn[1]

    def _remaining(self) -> tuple[list[list[int]], int]:
        """The global batches after ``offset`` (padded), and the position of the first one's first sample."""
        batches, seen, first = self._batches(), 0, 0
        while first < len(batches) and seen < self.offset:
            seen += len(batches[first])
            first += 1
        remaining = batches[first:]
        total = math.ceil(len(remaining) / self.num_replicas) * self.num_replicas
        while remaining and len(remaining) < total:
            remaining += batches[: total - len(remaining)]
        return remaining, seen

    def __iter__(self) -> Iterator[list[int]]:
        remaining, position = self._remaining()
        epoch, seed, mine = self.epoch, self.seed, []
        for j, batch in enumerate(remaining):
            if j % self.num_replicas == self.rank:
                mine.append([SampleIndex(index, position + i, epoch, seed) for i, index in enumerate(batch)])
            position += len(batch)
        return iter(mine)

    def __len__(self) -> int:
        return len(self._remaining()[0]) // self.num_replicas

    def samples_in_next_step(self, _size: int = 0) -> int:
        """Samples in the next step's batches over all ranks: what the position advances by."""
        if self._step_sizes is None:
            remaining, w = self._remaining()[0], self.num_replicas
            self._step_sizes = [sum(len(b) for b in remaining[k:k + w]) for k in range(0, len(remaining), w)]
        self._steps += 1
        return self._step_sizes[self._steps - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("source") is not None:
            self.source.load_state_dict(state["source"])


def prepare_loader(loader: Any, *, num_replicas: int, rank: int, seed: int, train: bool) -> Any:
    """``loader`` as a stage reads it: training data always gets a resumable sampler (it makes
    resume exact); evaluation data only when several ranks must shard it. A ``ShardedIterable``
    is told its rank and batch size."""
    dataset = loader.dataset if isinstance(loader, DataLoader) else None
    if isinstance(dataset, ShardedIterable):
        dataset.configure(rank=rank, world_size=num_replicas, batch_size=_iterable_batch_size(loader),
                          seed=seed, train=train)
        return loader
    if not train and num_replicas == 1:
        return loader
    if num_replicas > 1 and is_stateful(loader) and _whole_dataset_on_each_rank(loader):
        raise MisconfigurationError(
            f"This {type(loader).__name__} keeps its own state, and its {type(loader.sampler).__name__} would give "
            f"each of the {num_replicas} ranks the whole dataset: give it a sampler that shards (torchdata's "
            "StatefulDistributedSampler), or pass a plain DataLoader, which distloop shards and positions.")
    return with_resumable_sampler(loader, num_replicas=num_replicas, rank=rank, seed=seed, train=train)


def _whole_dataset_on_each_rank(loader: Any) -> bool:
    """Whether ``loader``'s sampler draws from the whole map-style dataset (not a rank's share of it)."""
    sampler, dataset = getattr(loader, "sampler", None), getattr(loader, "dataset", None)
    if sampler is None or hasattr(sampler, "num_replicas") or isinstance(dataset, IterableDataset):
        return False
    try:
        return len(sampler) == len(dataset)
    except TypeError:
        return False


def _iterable_batch_size(loader: DataLoader) -> int:
    if loader.batch_size is None:
        raise MisconfigurationError("A ShardedIterable counts samples: give its DataLoader a `batch_size` (and let the "
                                    "iterable yield single samples).")
    if loader.persistent_workers:
        raise MisconfigurationError("A ShardedIterable is told each epoch's position before its workers start: use "
                                    "`persistent_workers=False` with it.")
    return loader.batch_size


def with_resumable_sampler(loader: Any, *, num_replicas: int, rank: int, seed: int, train: bool) -> Any:
    """``loader`` rebuilt with a sampler that keeps the data position, where that can be done.

    A plain ``torch.utils.data.DataLoader`` over a map-style dataset gets a ``ResumableSampler``
    (over a permutation, or over its own sampler's order when that follows ``PROTOCOL``), or a
    ``ResumableBatchSampler`` around its batch sampler. Other iterables and iterable-style
    datasets are returned as they are: they must shard themselves across ranks.
    """
    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    if isinstance(sampler, ResumableSampler) or isinstance(batch_sampler, ResumableBatchSampler):
        return loader
    batch_size, drop_last = loader.batch_size, loader.drop_last
    if batch_size is None and type(batch_sampler) is BatchSampler:  # torch's own: its sampler is what to position
        sampler, batch_size, drop_last = batch_sampler.sampler, batch_sampler.batch_size, batch_sampler.drop_last
    if batch_size is None:  # batches from the user's batch sampler
        if batch_sampler is not None and positionable(batch_sampler):
            return _rebuild(loader, seed, rank,
                            batch_sampler=ResumableBatchSampler(batch_sampler, num_replicas, rank, seed))
        own = batch_sampler if batch_sampler is not None else sampler
    elif type(sampler) is SequentialSampler or (type(sampler) is RandomSampler and not sampler.replacement
                                                and sampler.num_samples == len(loader.dataset)):
        new = ResumableSampler(len(loader.dataset), num_replicas, rank, shuffle=isinstance(sampler, RandomSampler),
                               seed=seed, pad=train)
        return _rebuild(loader, seed, rank, sampler=new, batch_size=batch_size, drop_last=drop_last)
    elif positionable(sampler):
        new = ResumableSampler(len(sampler), num_replicas, rank, seed=seed, pad=train, source=sampler)
        return _rebuild(loader, seed, rank, sampler=new, batch_size=batch_size, drop_last=drop_last)
    else:
        own = sampler
    if num_replicas > 1:
        raise MisconfigurationError(
            f"This DataLoader's {type(own).__name__} cannot be sharded across {num_replicas} ranks: use "
            f"`shuffle=True/False` with `batch_size`, or make it resumable ({PROTOCOL}), or shard the data "
            "yourself in a distloop.data.ShardedIterable.")
    return loader


def _rebuild(loader: DataLoader, seed: int, rank: int, **sampling: Any) -> DataLoader:
    """``loader``'s arguments, its sampling replaced."""
    # Each epoch's iterator draws its workers' base seed from this generator; with the
    # global one, starting an iterator would shift the main random stream, and a run
    # resumed mid-epoch (which starts one more iterator) would not match an uninterrupted one.
    generator = loader.generator if loader.generator is not None else torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        loader.dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=generator,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers, pin_memory_device=loader.pin_memory_device, **sampling,
    )


def seed_workers(loader: Any, rank: int) -> Any:
    """``loader``, its workers seeded by ``rng.worker_init_function`` when ``seed_everything(workers=True)``
    asked for it and the loader has no ``worker_init_fn`` of its own (Lightning's rule)."""
    if seeding_workers() and isinstance(loader, DataLoader) and loader.worker_init_fn is None:
        loader.worker_init_fn = functools.partial(worker_init_function, rank=rank)
    return loader


def position_keeper(loader: Any) -> Any:
    """What keeps ``loader``'s position: its ``ResumableSampler``, ``ResumableBatchSampler`` or
    ``ShardedIterable`` (None for data distloop does not position)."""
    for holder in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                   getattr(loader, "dataset", None)):
        if isinstance(holder, (ResumableSampler, ResumableBatchSampler, ShardedIterable)):
            return holder
    return None


def is_stateful(loader: Any) -> bool:
    """Whether ``loader`` keeps its own position (``state_dict`` / ``load_state_dict``, as torchdata's
    ``StatefulDataLoader``), which distloop saves per rank instead of positioning it."""
    return (position_keeper(loader) is None and callable(getattr(loader, "state_dict", None))
            and callable(getattr(loader, "load_state_dict", None)))


def resumes_mid_epoch(loader: Any) -> bool:
    """Whether ``loader`` can start an epoch past the samples already trained on."""
    return position_keeper(loader) is not None or is_stateful(loader)


def set_epoch(loader: Any, epoch: int, samples_seen: int = 0) -> None:
    """Point ``loader``'s sampler at ``epoch``, past the ``samples_seen`` (global) already trained on.

    What keeps the position (``position_keeper``) starts at that offset; otherwise the first
    ``set_epoch`` found (sampler, batch sampler, the loader itself) is told the epoch, as
    ``DistributedSampler`` expects.
    """
    keeper = position_keeper(loader)
    if keeper is not None:
        if isinstance(keeper, ResumableSampler):
            samples_seen = min(samples_seen, keeper.num_samples)
        keeper.set_epoch(epoch, samples_seen)
        if isinstance(loader, DataLoader) and loader.generator is not None:
            # The epoch's workers take their base seed from this generator: a function of
            # (seed, rank, epoch), so a run resumed in a later epoch seeds them as an uninterrupted one.
            loader.generator.manual_seed(hash((keeper.seed, keeper.rank, epoch)) & (2**63 - 1))
        return
    for holder in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None), loader):
        if holder is not None and hasattr(holder, "set_epoch"):
            holder.set_epoch(epoch)
            return


def position_counter(loader: Any, world_size: int) -> Callable[[int], int]:
    """How far one batch of ``size`` samples on this rank moves the global position: ``size`` times
    the ranks, or, for batches of different sizes, the sizes of the batches all ranks took."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if isinstance(batch_sampler, ResumableBatchSampler):
        return batch_sampler.samples_in_next_step
    return functools.partial(int.__mul__, world_size)


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
