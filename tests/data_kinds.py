"""Every kind of training data distloop resumes, as a user writes it, and a module that records the
sample ids each rank trained on (a checkpoint part, so the record resumes with the run)."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

import distloop
from distloop.data import ShardedIterable, sample_generator
from distloop.state import StateFn

N, DIM, BATCH = 56, 4, 4
HAS_TORCHDATA = importlib.util.find_spec("torchdata") is not None


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, DIM, generator=g)
    return x, x.sum(dim=1, keepdim=True)


class Augmented(Dataset):
    """Map-style, with a random augmentation drawn in the worker from the sample's own generator."""

    def __init__(self) -> None:
        self.x, self.y = _tensors()

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        noise = torch.randn(DIM, generator=sample_generator(index))
        return int(index), self.x[index] + 0.1 * noise, self.y[index]


def stream(epoch: int):
    """A generator source: a per-epoch order, augmented inside the generator."""
    x, y = _tensors()
    for i in torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch)).tolist():
        yield i, x[i] + 0.1 * torch.randn(DIM, generator=sample_generator()), y[i]


class LengthBuckets(Sampler):
    """Length bucketing (the README's recipe): samples of one length together, as many per batch as fit
    ``max_tokens``; the samples within a length and the batch order shuffled per epoch."""

    def __init__(self, lengths: list[int], max_tokens: int, seed: int = 0) -> None:
        self.lengths, self.max_tokens, self.seed, self.epoch = lengths, max_tokens, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches, batch = [], []
        for i in sorted(order, key=lambda i: self.lengths[i]):  # stable: shuffled within a length
            if batch and (self.lengths[i] != self.lengths[batch[0]]
                          or (len(batch) + 1) * self.lengths[i] > self.max_tokens):
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
        return iter([batches[j] for j in torch.randperm(len(batches), generator=g).tolist()])

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ReshufflesWithState(Sampler):
    """A sampler with its own generator and ``state_dict``: each epoch's order moves the state on."""

    def __init__(self, n: int) -> None:
        self.n, self.generator_ = n, torch.Generator().manual_seed(9)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator_).tolist())

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"rng": self.generator_.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator_.set_state(state["rng"])


class PositionalLoader:
    """A hand-written loader that shards itself and keeps its own position (``state_dict``)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = Augmented(), rank, world_size
        self.epoch, self.yielded, self._start = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return N // (BATCH * self.world_size)

    def __iter__(self):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(7 + self.epoch)).tolist()
        start, self._start = (self._start if self._start < len(self) else 0), 0
        for k in range(start, len(self)):
            first = (k * self.world_size + self.rank) * BATCH
            items = [self.dataset[i] for i in order[first:first + BATCH]]
            self.yielded = k + 1
            yield torch.utils.data.default_collate(items)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.yielded, self._start = state["epoch"], state["yielded"], state["yielded"]


def _lengths() -> list[int]:
    return [2 if i % 8 < 5 else 3 for i in range(N)]  # 35 of length 2 (batches of 5), 21 of 3 (batches of 3)


def _torchdata(rank: int, world_size: int) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    dataset = Augmented()
    sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=3)
    return StatefulDataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=2)


# kind -> the training loader, given (rank, world size); each reads BATCH samples per rank and step
KINDS: dict[str, Callable[[int, int], Any]] = {
    "map": lambda rank, ws: DataLoader(Augmented(), batch_size=BATCH, shuffle=True, num_workers=2),
    "weighted_sampler": lambda rank, ws: DataLoader(
        Augmented(), batch_size=BATCH,
        sampler=WeightedRandomSampler(torch.linspace(1, 2, N).tolist(), N, replacement=False)),
    "stateful_sampler": lambda rank, ws: DataLoader(Augmented(), batch_size=BATCH, sampler=ReshufflesWithState(N)),
    "bucketing": lambda rank, ws: DataLoader(Augmented(), batch_sampler=LengthBuckets(_lengths(), max_tokens=10)),
    "sharded": lambda rank, ws: DataLoader(ShardedIterable(Augmented()), batch_size=BATCH, num_workers=2),
    "stream": lambda rank, ws: DataLoader(ShardedIterable(stream), batch_size=BATCH, num_workers=2),
    "stateful_loader": lambda rank, ws: PositionalLoader(rank, ws),
}
if HAS_TORCHDATA:
    KINDS["torchdata"] = _torchdata
# kinds that keep their own per-rank position: they resume on the same world size only
SAME_WORLD_SIZE_ONLY = {"stateful_loader", "torchdata"}


class Recorder(distloop.LoopModule):
    """A linear regression whose steps record (epoch, sample ids) per rank."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(DIM, 1)
        self.seen: list[tuple[int, list[int]]] = []
        self.before: list[list] | None = None  # every rank's record when the run resumed

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, x, y = batch
        self.seen.append((self.trainer.current_epoch, ids.tolist()))
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def record_part(self) -> StateFn:
        def load(state: list[list]) -> None:
            self.before = state
            rank = self.trainer.global_rank
            self.seen = list(state[rank]) if len(state) == self.trainer.world_size else []

        return StateFn(lambda: self.trainer.strategy.gather_object(self.seen), load)


def fit(kind: str, root: str, callbacks: list = (), max_epochs: int = 2, max_steps: int = -1) -> dict:
    """Fit on ``kind`` (resuming from ``root``'s last checkpoint, if any): this rank's result."""
    trainer = distloop.Trainer(
        max_epochs=max_epochs, max_steps=max_steps, default_root_dir=root, seed=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[distloop.ModelCheckpoint(every_n_train_steps=2, save_last=True, save_top_k=-1), *callbacks])
    module = Recorder()
    trainer.run_state.register("seen", module.record_part())
    trainer.fit(module, KINDS[kind](trainer.global_rank, trainer.world_size), ckpt_path="last")
    return {"weights": {k: v.clone() for k, v in module.state_dict().items()}, "seen": module.seen,
            "before": module.before, "rank": trainer.global_rank, "world_size": trainer.world_size}
