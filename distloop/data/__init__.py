"""The training data's position and state: what makes resuming exact for every kind of data.

- ``position``: the global sample offset within an epoch, and the samplers that start
  there (``ResumableSampler``, ``ResumableBatchSampler`` for a user's sampler or batch sampler);
- ``sharded``: ``ShardedIterable``, for iterable and streaming sources;
- ``randomness``: ``sample_generator``, per-sample randomness that survives a resume;
- ``state``: the checkpoint's ``data`` part (fingerprint, stateful loaders per rank).
"""

from distloop.data.position import (
    PROTOCOL, ResumableBatchSampler, ResumableSampler, is_stateful, num_batches, position_counter, positionable,
    prepare_loader, resumes_mid_epoch, seed_workers, set_epoch, with_resumable_sampler,
)
from distloop.data.randomness import SampleIndex, sample_generator
from distloop.data.sharded import ShardedIterable
from distloop.data.state import DataState, fingerprint

__all__ = [
    "PROTOCOL", "DataState", "ResumableBatchSampler", "ResumableSampler", "SampleIndex", "ShardedIterable",
    "fingerprint", "is_stateful", "num_batches", "position_counter", "positionable", "prepare_loader",
    "resumes_mid_epoch", "sample_generator", "seed_workers", "set_epoch", "with_resumable_sampler",
]
