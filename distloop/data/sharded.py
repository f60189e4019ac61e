"""``ShardedIterable``: an iterable or streaming source, sharded over ranks and workers, that resumes.

Position ``g`` is the ``g``-th sample of the epoch's stream. A step takes the next
``world_size * batch_size`` positions; rank ``r`` takes every ``world_size``-th of them,
from ``r``; local batch ``k`` is read by DataLoader worker ``k % num_workers``, which is the
order the DataLoader hands batches out in. After ``s`` steps the run has used exactly the
first ``s * world_size * batch_size`` positions, on any world size, so resuming at that
offset is exact on the same world size and takes every sample once on another one.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from distloop.data.randomness import SampleIndex, set_current_sample


class ShardedIterable(IterableDataset):
    """Wrap ``source`` for a ``DataLoader(ShardedIterable(source), batch_size=B, num_workers=K)``.

    ``source`` is one of:

    - indexable by position (``__len__`` and ``__getitem__``, a map-style dataset): each
      sample is read where it is needed, and a resume starts at once wherever it lands;
    - an iterable (an ``IterableDataset``, with ``set_epoch(epoch)`` if its order changes per
      epoch) or a function ``source(epoch)`` returning one: every worker reads the stream and
      keeps its own samples, and a resume reads past the samples already used. The stream
      must give the same samples in the same order for the same epoch.

    Inside the source, ``distloop.data.sample_generator()`` is the generator of the sample
    being produced; an indexable source gets ``SampleIndex``es to pass it. The Trainer tells
    the wrapper its rank, the batch size and each epoch's position; in training, a last step
    too short for every rank is cut to the same number of samples on each (what is left
    over, fewer than the ranks, is dropped), so all ranks take the same number of steps.
    """

    def __init__(self, source: Any) -> None:
        self.source = source
        self.indexable = (not isinstance(source, IterableDataset) and hasattr(source, "__getitem__")
                          and hasattr(source, "__len__"))
        if not (self.indexable or hasattr(source, "__iter__") or callable(source)):
            raise TypeError(f"ShardedIterable needs an indexable, iterable or callable source, not "
                            f"{type(source).__name__}.")
        self.rank, self.world_size, self.batch_size, self.seed, self.train = 0, 1, 1, 0, True
        self.epoch, self.offset = 0, 0

    def configure(self, *, rank: int, world_size: int, batch_size: int, seed: int, train: bool) -> None:
        """Where this copy runs (the Trainer calls it when it prepares the loader)."""
        self.rank, self.world_size, self.batch_size, self.seed, self.train = rank, world_size, batch_size, seed, train

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Start ``epoch`` at global position ``offset``."""
        self.epoch, self.offset = epoch, offset

    def __len__(self) -> int:
        """This rank's samples from the current position on (a source without a length has none)."""
        total = len(self.source)
        left = max(total - self.offset, 0)
        step = self.world_size * self.batch_size
        full, tail = divmod(left, step)
        return full * self.batch_size + self._tail_count(tail)

    def _tail_count(self, tail: int) -> int:
        """How many of a short last step's ``tail`` samples this rank takes."""
        if self.train:
            return tail // self.world_size
        return len(range(self.rank, tail, self.world_size))

    def _positions(self, base: int, count: int) -> range:
        """This rank's positions among the ``count`` samples of the step starting at ``base``."""
        n = self.batch_size if count >= self.world_size * self.batch_size else self._tail_count(count)
        return range(base + self.rank, base + self.rank + n * self.world_size, self.world_size)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        steps = itertools.count(worker, workers)
        try:
            yield from (self._indexed(steps) if self.indexable else self._streamed(worker, workers))
        finally:
            set_current_sample(None)

    def _sample(self, position: int) -> SampleIndex:
        return SampleIndex(position, position, self.epoch, self.seed)

    def _indexed(self, steps: Iterator[int]) -> Iterator[Any]:
        total, step_size = len(self.source), self.world_size * self.batch_size
        for step in steps:
            base = self.offset + step * step_size
            if base >= total:
                return
            for position in self._positions(base, min(step_size, total - base)):
                index = self._sample(position)
                set_current_sample(index)
                yield self.source[index]

    def _stream(self) -> Iterator[Any]:
        source = self.source
        if hasattr(source, "set_epoch"):
            source.set_epoch(self.epoch)
        return iter(source(self.epoch) if callable(source) and not hasattr(source, "__iter__") else source)

    def _streamed(self, worker: int, workers: int) -> Iterator[Any]:
        stream, step_size = self._stream(), self.world_size * self.batch_size
        position = 0
        for _ in range(self.offset):  # a stream resumes by reading past what was used
            set_current_sample(self._sample(position))
            if next(stream, _END) is _END:
                return
            position += 1
        for step in itertools.count():
            base, mine, count = position, [], 0
            wanted = step % workers == worker
            while count < step_size:
                set_current_sample(self._sample(position))
                sample = next(stream, _END)
                if sample is _END:
                    break
                if wanted and (position - base) % self.world_size == self.rank:
                    mine.append(sample)
                position, count = position + 1, count + 1
            if wanted:
                yield from mine[:len(self._positions(base, count))]
            if count < step_size:
                return


_END = object()
