"""One batch of look-ahead, so a loop knows a batch is the last before it runs it."""

from __future__ import annotations

import math
from typing import Any, Iterable

_END = object()


class Prefetcher:
    """Yields ``(batch, is_last)``, stopping after ``limit`` batches."""

    def __init__(self, iterable: Iterable, limit: float = math.inf) -> None:
        self._iterator = iter(iterable)
        self._limit = limit
        self.fetched = 0
        self._next = self._fetch()

    def _fetch(self) -> Any:
        if self.fetched >= self._limit:
            return _END
        try:
            batch = next(self._iterator)
        except StopIteration:
            return _END
        self.fetched += 1
        return batch

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[Any, bool]:
        batch = self._next
        if batch is _END:
            raise StopIteration
        self._next = self._fetch()
        return batch, self._next is _END
