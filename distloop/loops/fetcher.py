"""Batches of an epoch, each with whether it is the last one.

When the data has a length, "last" is known by counting, and nothing is fetched before it
is needed: fetching may draw random numbers (augmentations), and a batch drawn ahead of a
checkpoint would shift the random stream of a resumed run. Data without a length is read
one batch ahead instead.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from distloop.data import is_stateful
from distloop.progress import BatchProgress

_END = object()


class BatchIterator:
    """Yields ``(batch, is_last)``, stopping after ``limit`` batches.

    It fetches ahead only when it must: for data without a length, one batch ahead; a loader
    that keeps its own state is then asked for it before each fetch ahead (``source_state``).
    """

    def __init__(self, iterable: Iterable, limit: float = math.inf) -> None:
        self._source = iterable
        self._iterator = iter(iterable)
        self._limit = limit
        self.fetched = 0
        try:
            self._count: float | None = min(limit, len(iterable))  # type: ignore[arg-type]
        except TypeError:
            self._count = None
        self._stateful = self._count is None and is_stateful(iterable)
        self._state: Any = None
        self._next = self._fetch_ahead() if self._count is None else None

    def _fetch_ahead(self) -> Any:
        if self._stateful:
            self._state = self._source.state_dict()  # type: ignore[attr-defined]
        return self._fetch()

    def source_state(self) -> Any:
        """The loader's state after the batches yielded so far (not those fetched ahead)."""
        return self._state if self._stateful else self._source.state_dict()  # type: ignore[attr-defined]

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
        self._next = self._fetch_ahead()
        return batch, self._next is _END


def next_batch(batches: BatchIterator, progress: BatchProgress, strategy: Any) -> tuple[Any, int]:
    """The next batch, on the device, and its index, counted as ready; ``StopIteration`` at the end."""
    batch, progress.is_last_batch = next(batches)
    batch_idx = progress.current.ready
    progress.increment_ready()
    return strategy.batch_to_device(batch), batch_idx
