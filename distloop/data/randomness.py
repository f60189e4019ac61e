"""Per-sample randomness: the same random numbers for the n-th sample of an epoch, whoever loads it.

A random augmentation in a DataLoader worker draws from that worker's stream, which depends
on which worker got the sample and on how far the worker had come: a run resumed mid-epoch
restarts its workers, so the same sample is augmented differently. ``sample_generator``
instead seeds a generator from (seed, epoch, the sample's position in the epoch's global
order), which are the same in every worker, on every rank, in every attempt.
"""

from __future__ import annotations

import hashlib
import os
import threading

import torch


class SampleIndex(int):
    """A dataset index (it is the ``int``) that also knows where it stands in the run: its
    ``position`` in the epoch's global order, the ``epoch`` and the run's ``seed``.

    distloop's training samplers hand these to ``Dataset.__getitem__``; pass one to
    ``sample_generator``.
    """

    def __new__(cls, index: int, position: int, epoch: int, seed: int) -> SampleIndex:
        self = super().__new__(cls, index)
        self.position, self.epoch, self.seed = position, epoch, seed
        return self

    def __reduce__(self) -> tuple:  # to worker processes, compactly
        return SampleIndex, (int(self), self.position, self.epoch, self.seed)


_current = threading.local()  # the sample a ShardedIterable is producing now, in this worker


def set_current_sample(sample: SampleIndex | None) -> None:
    """The sample that ``sample_generator()`` without an argument stands for (``ShardedIterable`` sets it)."""
    _current.sample = sample


def sample_generator(index: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` for one sample's randomness (augmentations), seeded from (seed, epoch, position).

    ``index`` is what ``__getitem__`` received: under distloop's training sampler a
    ``SampleIndex``; a plain int (evaluation data, a loader distloop did not prepare) stands
    for itself in epoch 0 with the ``PL_GLOBAL_SEED`` seed. Without ``index``: the sample a
    ``ShardedIterable`` is producing now, for randomness inside the iterable's own code.
    """
    if index is None:
        index = getattr(_current, "sample", None)
        if index is None:
            raise RuntimeError("sample_generator() without an index is for code a distloop.data.ShardedIterable "
                               "runs while producing a sample; in __getitem__, pass the index it received.")
    if isinstance(index, SampleIndex):
        seed, epoch, position = index.seed, index.epoch, index.position
    else:
        seed, epoch, position = int(os.environ.get("PL_GLOBAL_SEED", "0")), 0, int(index)
    digest = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)
