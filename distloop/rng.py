"""Random number generators: seeding a run, and each rank's states for a checkpoint."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from distloop.errors import MisconfigurationError

_MASK64 = (1 << 64) - 1


def seed_everything(seed: int | None = None, workers: bool = False, verbose: bool = True) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA), as Lightning does; returns the seed.

    ``seed=None`` reads ``PL_GLOBAL_SEED`` (0 when unset). ``workers=True`` makes the Trainer give
    every DataLoader without a ``worker_init_fn`` one that seeds each worker from (base seed,
    worker id, global rank): Lightning's derivation, so augmentations draw the same numbers.
    The variables ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS`` carry both to launched processes.
    """
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    seed = int(seed)
    if not 0 <= seed <= 2**32 - 1:
        raise MisconfigurationError(f"seed={seed} is out of bounds: NumPy takes seeds from 0 to {2**32 - 1}.")
    if verbose:
        logging.getLogger("distloop").info("Seed set to %d", seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def seeding_workers() -> bool:
    """Whether ``seed_everything(..., workers=True)`` asked for seeded DataLoader workers."""
    return os.environ.get("PL_SEED_WORKERS", "0") == "1"


def worker_init_function(worker_id: int, rank: int = 0) -> None:
    """Seed a DataLoader worker's torch, Python and NumPy streams from its base seed, id and rank.

    torch gives worker ``i`` the seed ``base + i``; the base comes from the main process's
    stream, restored exactly on resume, so a resumed epoch's workers draw the same numbers.
    """
    base = torch.initial_seed() - worker_id
    seeds = _seed_sequence(base, worker_id, rank, count=4)
    torch.manual_seed(seeds[0])
    random.seed((seeds[1] << 32) | seeds[2])
    np.random.seed(np.random.SeedSequence([base, worker_id, rank]).generate_state(4))


def _seed_sequence(base: int, worker_id: int, rank: int, count: int) -> list[int]:
    """``count`` 64-bit seeds: the three numbers mixed into one (a 64-bit finalizer), then an LCG."""
    x = (base << 32) | (worker_id << 16) | rank
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        x ^= x >> 33
        x = (x * multiplier) & _MASK64
    x ^= x >> 33
    seeds = []
    for _ in range(count):
        x = (x * 6364136223846793005 + 1) & _MASK64
        seeds.append(x)
    return seeds


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, as data ``weights_only`` loading accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
