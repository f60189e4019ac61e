"""Batches of an epoch, each with whether it is the last one.

When the data has a length, "last" is known by counting, and nothing is fetched before it
is needed: fetching may draw random numbers (augmentations), and a batch drawn ahead of a
checkpoint would shift the random stream of a resumed run. Data without a length is read
one batch ahead instead.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from distloop.progress import BatchProgress

_END = object()


class BatchIterator:
    """Yields ``(batch, is_last)``, stopping after ``limit`` batches.

    It fetches ahead only when it must: for data without a length, one batch ahead.
    """

    def __init__(self, iterable: Iterable, limit: float = math.inf) -> None:
        self._iterator = iter(iterable)
        self._limit = limit
        self.fetched = 0
        try:
            self._count: float | None = min(limit, len(iterable))  # type: ignore[arg-type]
        except TypeError:
            self._count = None
        self._next = self._fetch() if self._count is None else None

    def _fetch(self) -> Any:
        if self.fetched >= self._limit:
            return _END
        try:
            batch = next(self._iterator)
        except StopIteration:
            return _END
        self.fetched += 1
        return batch

    @property
    def count(self) -> float | None:
        """How many batches it yields, when the data has a length (``None`` otherwise)."""
        return self._count

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[Any, bool]:
        count = self._count
        if count is not None:
            if self.fetched >= count:
                raise StopIteration
            batch = next(self._iterator)  # StopIteration here ends the epoch early: fine
            self.fetched += 1
            return batch, self.fetched >= count
        batch = self._next
        if batch is _END:
            raise StopIteration
        self._next = self._fetch()
        return batch, self._next is _END


def next_batch(batches: BatchIterator, progress: BatchProgress, strategy: Any) -> tuple[Any, int]:
    """The next batch, on the device, and its index, counted as ready; ``StopIteration`` at the end."""
    batch, progress.is_last_batch = next(batches)
    batch_idx = progress.current.ready
    progress.increment_ready()
    return strategy.batch_to_device(batch), batch_idx
