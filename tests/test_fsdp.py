"""FSDP2 over gloo on CPU: the same training as one process, parameters sharded 1/N per rank,
averaged gradients, evaluation, bf16-mixed, a module that shards itself, per-class sharding,
and the options refused.

The multi-process runs are grouped: one spawn per world size runs every scenario in turn
(each one a Trainer entry point, making and destroying its own process group) and saves
what each rank saw; the tests below compare that with one process on the same global batches.
"""

from __future__ import annotations

import math
import traceback
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import Callback, LoopModule, MisconfigurationError, Trainer
from distloop.strategies import FSDPStrategy, SingleDeviceStrategy

N_SAMPLES = 24
GLOBAL_BATCH = 6  # 3 per rank on 2 ranks, 2 per rank on 3
EVAL_BATCH = 4
SPAWN_TIMEOUT = 120


def dataset(n: int = N_SAMPLES) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ torch.linspace(-1.0, 1.0, 8).unsqueeze(1)) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(torch.arange(n), x, y)


def train_loader(world_size: int) -> DataLoader:
    # distloop's sampler deals rank r the samples r, r+N, ... of the (seeded) epoch order: the
    # ranks' batches of GLOBAL_BATCH / world_size make up one process's batch of GLOBAL_BATCH.
    return DataLoader(dataset(), batch_size=GLOBAL_BATCH // world_size, shuffle=True)


def eval_loader() -> DataLoader:
    return DataLoader(dataset(), batch_size=EVAL_BATCH)


class Mlp(LoopModule):
    """Linear(8, 16) - ReLU - Linear(16, 1) in a Sequential: FSDP's default shards ``net`` and the root."""

    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.optimizer = optimizer

    def training_step(self, batch, batch_idx):
        _, x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1.0)
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.1)


class SelfSharded(Mlp):
    """Shards itself in configure_model, bottom-up, over a mesh of its own."""

    def configure_model(self):
        if isinstance(self, FSDPModule):  # configure_model runs every entry point
            return
        # The strategy makes its mesh after configure_model (in setup_module): make one over the ranks.
        mesh = getattr(self.trainer.strategy, "mesh", None) or init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[2], mesh=mesh)
        fully_shard(self, mesh=mesh)


class DtypeInForward(Mlp):
    """Records the dtype of the first layer's weight while it runs (FSDP's gathered, cast copy)."""

    def configure_model(self):
        self.forward_dtypes: list[str] = []
        self.net[0].register_forward_pre_hook(lambda m, args: self.forward_dtypes.append(str(m.weight.dtype)))


class Evaluated(LoopModule):
    """``training_step`` without ``batch_idx``; every evaluation stage, one metric each."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch):
        _, x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        _, x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        _, x, y = batch
        self.log("test_mae", F.l1_loss(self.net(x), y), sync_dist=True)
        self.log("test_count", float(len(y)), reduce_fx="sum", sync_dist=True)

    def predict_step(self, batch, batch_idx):
        ids, x, _ = batch
        return ids, self.net(x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full weights (gathering each DTensor: a collective under FSDP)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in module.state_dict().items()}


class Observe(Callback):
    """What the run looked like at its start, and its full weights at its end (before teardown)."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def on_train_start(self, trainer, module):
        self.seen["start"] = full_state(module)
        self.seen["local_numel"] = {n: (p.to_local() if isinstance(p, DTensor) else p).numel()
                                    for n, p in module.named_parameters()}
        self.seen["placements"] = {n: [(type(pl).__name__, getattr(pl, "dim", None)) for pl in p.placements]
                                   if isinstance(p, DTensor) else None for n, p in module.named_parameters()}
        self.seen["mesh_sizes"] = {n: p.device_mesh.size() if isinstance(p, DTensor) else None
                                   for n, p in module.named_parameters()}
        self.seen["dtypes"] = {n: str(p.dtype) for n, p in module.named_parameters()}
        self.seen["fsdp_modules"] = sorted(name or "<root>" for name, m in module.named_modules()
                                           if isinstance(m, FSDPModule))

    def on_train_end(self, trainer, module):
        self.seen["end"] = full_state(module)
        self.seen["global_step"] = trainer.global_step


def trainer_kwargs(root: str, **kwargs: Any) -> dict[str, Any]:
    return {"max_epochs": 2, "seed": 5, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": root, **kwargs}


TRAINING = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}


def fsdp(**options: Any) -> FSDPStrategy:
    return FSDPStrategy(accelerator="cpu", timeout_s=60, **options)


def fit(module: LoopModule, strategy: Any, root: str, world_size: int, **kwargs: Any) -> tuple[Trainer, dict]:
    observe = Observe()
    trainer = Trainer(strategy=strategy, callbacks=[observe], **trainer_kwargs(root, **kwargs))
    trainer.fit(module, train_loader(world_size))
    return trainer, observe.seen


# ------------------------------------------------------------------ the ranks' scenarios
def _count_strategy_shards(calls: list[str]):
    """distloop's own fully_shard calls, recorded by the module class they shard."""
    import distloop.strategies.fsdp as fsdp_module

    real = fsdp_module.fully_shard

    def counting(module, **kwargs):
        calls.append(type(module).__name__)
        return real(module, **kwargs)

    fsdp_module.fully_shard = counting
    return lambda: setattr(fsdp_module, "fully_shard", real)


def _scenario_fit(rank, world_size, root):
    calls: list[str] = []
    restore = _count_strategy_shards(calls)
    try:
        trainer, seen = fit(Mlp(), "fsdp", root, world_size, **TRAINING)  # the string resolves to FSDPStrategy
    finally:
        restore()
    assert isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size == world_size
    return {**seen, "strategy_shard_calls": calls}


def _scenario_no_sync(rank, world_size, root):
    return fit(Mlp(), fsdp(sync_every_micro_batch=False), root, world_size, **TRAINING)[1]


def _scenario_sgd_step(rank, world_size, root):
    return fit(Mlp("sgd"), fsdp(shard_modules=[nn.Linear]), root, world_size, max_steps=1)[1]


def _scenario_linear_by_path(rank, world_size, root):
    return fit(Mlp(), fsdp(shard_modules=["torch.nn.Linear"]), root, world_size, **TRAINING)[1]


def _scenario_self_sharded(rank, world_size, root):
    calls: list[str] = []
    restore = _count_strategy_shards(calls)
    module = SelfSharded()
    try:
        _, seen = fit(module, fsdp(), root, world_size, **TRAINING)
    finally:
        restore()
    return {**seen, "strategy_shard_calls": calls}


def _scenario_bf16(rank, world_size, root):
    module = DtypeInForward()
    seen = fit(module, fsdp(precision="bf16-mixed"), root, world_size, **TRAINING)[1]
    return {**seen, "forward_dtypes": module.forward_dtypes}


def _scenario_evaluate(rank, world_size, root):
    module = Evaluated()
    trainer = Trainer(strategy=fsdp(), **trainer_kwargs(root, max_epochs=1))
    trainer.fit(module, train_loader(world_size))
    [val] = trainer.validate(module, eval_loader())
    [test] = trainer.test(module, eval_loader())
    predictions = trainer.predict(module, eval_loader())
    ids = torch.cat([i for i, _ in predictions])
    outputs = torch.cat([o for _, o in predictions])
    return {"val": val, "test": test, "ids": ids, "outputs": outputs, "global_step": trainer.global_step}


SCENARIOS = {
    2: ["fit", "no_sync", "sgd_step", "linear_by_path", "self_sharded", "bf16", "evaluate"],
    3: ["fit", "sgd_step"],
}


def _ranks(rank, world_size, root, out):
    results: dict[str, Any] = {}
    for name in SCENARIOS[world_size]:
        try:
            results[name] = globals()[f"_scenario_{name}"](rank, world_size, f"{root}/{name}")
        except Exception:  # noqa: BLE001 - the test of this scenario shows it
            results[name] = {"error": traceback.format_exc()}
            break  # the other ranks may now wait in a collective: stop before the next one
    torch.save(results, f"{out}-rank{rank}.pt")


_RUNS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(world_size)``: every rank's results of SCENARIOS[world_size], run once per module."""

    def results(world_size: int) -> list[dict[str, Any]]:
        if world_size not in _RUNS:
            root = tmp_path_factory.mktemp(f"fsdp{world_size}")
            spawn(_ranks, world_size, str(root), str(root / "out"), init=False, timeout=SPAWN_TIMEOUT)
            _RUNS[world_size] = [torch.load(root / f"out-rank{r}.pt", weights_only=True)
                                 for r in range(world_size)]
        return _RUNS[world_size]

    return results


def scenario(runs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Every rank's results of scenario ``name``; its error (or the earlier one that stopped it) if it failed."""
    for rank, results in enumerate(runs):
        failed = [n for n, r in results.items() if "error" in r]
        if name not in results:
            last = results[failed[0]]["error"].strip().splitlines()[-1] if failed else "none"
            pytest.fail(f"rank {rank} did not reach scenario {name!r}: scenario {failed} failed first ({last})")
        if name in failed:
            pytest.fail(f"rank {rank}, scenario {name!r}:\n{results[name]['error']}")
    return [results[name] for results in runs]


# ------------------------------------------------------------------ one process, the reference
_SINGLE: dict[str, Any] = {}


def single(name: str, tmp_path_factory) -> dict[str, Any]:
    """The one-process run a scenario must match: the global batches on SingleDeviceStrategy."""
    if name not in _SINGLE:
        root = str(tmp_path_factory.mktemp(f"single-{name}"))
        if name == "fit":
            trainer, seen = fit(Mlp(), "auto", root, 1, **TRAINING)
            assert isinstance(trainer.strategy, SingleDeviceStrategy)
        elif name == "fit_unclipped":
            seen = fit(Mlp(), "auto", root, 1, accumulate_grad_batches=2)[1]
        elif name == "sgd_step":
            seen = fit(Mlp("sgd"), "auto", root, 1, max_steps=1)[1]
        else:
            assert name == "evaluate"
            module = Evaluated()
            trainer = Trainer(**trainer_kwargs(root, max_epochs=1))
            trainer.fit(module, train_loader(1))
            [val] = trainer.validate(module, eval_loader())
            [test] = trainer.test(module, eval_loader())
            predictions = trainer.predict(module, eval_loader())
            seen = {"val": val, "test": test, "ids": torch.cat([i for i, _ in predictions]),
                    "outputs": torch.cat([o for _, o in predictions]), "global_step": trainer.global_step}
        _SINGLE[name] = seen
    return _SINGLE[name]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def assert_trained(seen: dict[str, Any]) -> None:
    """The weights moved (a run that did not train would match nothing by accident, but say so)."""
    assert any(not torch.allclose(seen["start"][k], seen["end"][k]) for k in seen["start"])


# ------------------------------------------------------------------ the same training as one process
@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp_fit_equals_one_process_on_the_same_global_batches(ranks, tmp_path_factory, world_size):
    runs = scenario(ranks(world_size), "fit")
    reference = single("fit", tmp_path_factory)
    # The clipping matters here: without it one process ends elsewhere (so a per-shard norm would show).
    unclipped = single("fit_unclipped", tmp_path_factory)
    assert max((unclipped["end"][k] - reference["end"][k]).abs().max().item() for k in reference["end"]) > 1e-3
    assert reference["global_step"] == 2 * N_SAMPLES // GLOBAL_BATCH // 2 == 4
    assert_trained(reference)
    for seen in runs:
        assert seen["global_step"] == reference["global_step"]
        assert_same_weights(seen["start"], reference["start"])
        assert_same_weights(seen["end"], reference["end"])


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_fsdp_without_sync_every_micro_batch_trains_the_same(ranks, tmp_path_factory):
    reference = single("fit", tmp_path_factory)
    for seen in scenario(ranks(2), "no_sync"):
        assert seen["global_step"] == reference["global_step"]
        assert_same_weights(seen["end"], reference["end"])


# ------------------------------------------------------------------ each rank holds 1/N
@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_holds_about_one_nth_of_the_parameters(ranks, world_size):
    runs = scenario(ranks(world_size), "fit")
    shapes = {n: p.shape for n, p in Mlp().named_parameters()}
    total = sum(math.prod(s) for s in shapes.values())
    per_rank = [sum(seen["local_numel"].values()) for seen in runs]
    assert sum(per_rank) == total  # every element on exactly one rank, no padding counted
    # FSDP2 splits every parameter on dim 0: a rank holds at most ceil(rows / N) rows of each.
    bound = sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in shapes.values())
    largest_layer = 8 * 16 + 16
    for rank, held in enumerate(per_rank):
        assert held <= bound <= total / world_size + largest_layer, (rank, per_rank)
        assert held < 0.6 * total, (rank, per_rank)  # not replicated
    for name in shapes:  # each parameter itself is split, not handed whole to one rank
        numels = [seen["local_numel"][name] for seen in runs]
        assert sum(numels) == math.prod(shapes[name])
        if shapes[name][0] >= world_size:
            assert max(numels) <= math.ceil(shapes[name][0] / world_size) * math.prod(shapes[name][1:]), name
    for seen in runs:  # a DTensor split on dim 0 over all the ranks
        assert all(p == [("Shard", 0)] for p in seen["placements"].values()), seen["placements"]
        assert set(seen["mesh_sizes"].values()) == {world_size}


# ------------------------------------------------------------------ averaged gradients
@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_gradients_are_averaged_over_the_ranks_not_summed(ranks, tmp_path_factory, world_size):
    reference = single("sgd_step", tmp_path_factory)  # SGD, lr=1: the update is the gradient
    assert reference["global_step"] == 1
    for seen in scenario(ranks(world_size), "sgd_step"):
        assert seen["global_step"] == 1
        assert_same_weights(seen["start"], reference["start"])
        for name, before in reference["start"].items():
            expected = before - reference["end"][name]
            update = seen["start"][name] - seen["end"][name]
            assert expected.abs().max() > 1e-3, name  # a real step, large enough to tell N times it apart
            torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ evaluation, training_step(batch)
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_validate_test_and_predict_under_fsdp_equal_one_process(ranks, tmp_path_factory):
    reference = single("evaluate", tmp_path_factory)
    runs = scenario(ranks(2), "evaluate")
    assert reference["global_step"] == N_SAMPLES // GLOBAL_BATCH
    for seen in runs:
        assert seen["global_step"] == reference["global_step"]  # training_step(self, batch) trained
        assert seen["val"].keys() == reference["val"].keys() == {"val_loss"}
        assert seen["val"]["val_loss"] == pytest.approx(reference["val"]["val_loss"], rel=1e-5)
        assert seen["test"]["test_mae"] == pytest.approx(reference["test"]["test_mae"], rel=1e-5)
        assert seen["test"]["test_count"] == reference["test"]["test_count"] == N_SAMPLES
    # Each rank predicts its own shard; together, every sample once, as one process predicts it.
    ids = torch.cat([seen["ids"] for seen in runs])
    outputs = torch.cat([seen["outputs"] for seen in runs])
    assert sorted(ids.tolist()) == list(range(N_SAMPLES))
    assert reference["ids"].tolist() == list(range(N_SAMPLES))
    torch.testing.assert_close(outputs[ids.argsort()], reference["outputs"], rtol=1e-5, atol=1e-6)


def _validate_uneven(rank, world_size, out):
    # 25 samples on 2 ranks: rank 0 gets 13 (4 batches of 4), rank 1 gets 12 (3 batches).
    trainer = Trainer(strategy=FSDPStrategy(accelerator="cpu", timeout_s=8), **trainer_kwargs(out))
    [metrics] = trainer.validate(Evaluated(), DataLoader(dataset(25), batch_size=EVAL_BATCH))
    [tested] = trainer.test(trainer.module, DataLoader(dataset(25), batch_size=EVAL_BATCH))
    predicted = trainer.predict(trainer.module, DataLoader(dataset(25), batch_size=EVAL_BATCH))
    ids = torch.cat([ids for ids, _ in predicted])
    torch.save({**metrics, **tested, "ids": ids}, f"{out}-rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_evaluation_on_uneven_shards_under_fsdp_equals_one_process(tmp_path):
    # The rank with fewer batches runs its last step again, unlogged, for the other's all-gathers.
    spawn(_validate_uneven, 2, str(tmp_path / "m"), init=False, timeout=60)
    [single_metrics] = Trainer(**trainer_kwargs(str(tmp_path / "single"))).validate(
        Evaluated(), DataLoader(dataset(25), batch_size=EVAL_BATCH))
    runs = [torch.load(tmp_path / f"m-rank{rank}.pt", weights_only=True) for rank in range(2)]
    for metrics in runs:
        assert metrics["val_loss"] == pytest.approx(single_metrics["val_loss"], rel=1e-5)
        assert metrics["test_count"] == 25  # each sample once: the padding steps log nothing
    assert sorted(torch.cat([r["ids"] for r in runs]).tolist()) == list(range(25))


# ------------------------------------------------------------------ bf16-mixed
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_shards(ranks, tmp_path_factory):
    reference = single("fit", tmp_path_factory)
    for seen in scenario(ranks(2), "bf16"):
        assert seen["global_step"] == reference["global_step"]
        assert set(seen["dtypes"].values()) == {"torch.float32"}  # the sharded parameters the optimizer steps
        assert seen["forward_dtypes"] and set(seen["forward_dtypes"]) == {"torch.bfloat16"}  # the gathered ones
        assert_trained(seen)
        for name, value in seen["end"].items():  # near the fp32 run: bf16's rounding, not another training
            assert value.dtype == torch.float32 and torch.isfinite(value).all()
            torch.testing.assert_close(value, reference["end"][name], rtol=0, atol=0.05)


# ------------------------------------------------------------------ a module that shards itself
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_a_module_sharded_in_configure_model_is_not_sharded_again(ranks, tmp_path_factory):
    default = scenario(ranks(2), "fit")
    assert all(seen["strategy_shard_calls"] == ["Sequential", "Mlp"] for seen in default)  # the counter counts
    reference = single("fit", tmp_path_factory)
    for seen in scenario(ranks(2), "self_sharded"):
        assert seen["strategy_shard_calls"] == []
        assert seen["fsdp_modules"] == ["<root>", "net.0", "net.2"]
        assert all(p == [("Shard", 0)] for p in seen["placements"].values()), seen["placements"]
        assert_same_weights(seen["end"], reference["end"])
    for mine, theirs in zip(scenario(ranks(2), "self_sharded"), default):  # the shards of one sharding, not two
        assert mine["local_numel"] == theirs["local_numel"]
        assert set(mine["mesh_sizes"].values()) == {2}


# ------------------------------------------------------------------ shard_modules
@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_shard_modules_shards_each_module_of_the_class_on_its_own(ranks, tmp_path_factory):
    runs = ranks(2)
    for seen in scenario(runs, "fit"):  # by default: each direct child holding parameters, then the root
        assert seen["fsdp_modules"] == ["<root>", "net"]
    for name in ("sgd_step", "linear_by_path"):  # [nn.Linear], and "torch.nn.Linear"
        for seen in scenario(runs, name):
            assert seen["fsdp_modules"] == ["<root>", "net.0", "net.2"], name
    for seen in scenario(runs, "linear_by_path"):
        assert_same_weights(seen["end"], single("fit", tmp_path_factory)["end"])


# ------------------------------------------------------------------ refused options, one process
def test_cpu_offload_on_a_cpu_run_is_refused():
    with pytest.raises(MisconfigurationError, match="cpu_offload"):
        FSDPStrategy(accelerator="cpu", cpu_offload=True)


@pytest.mark.parametrize("entry", ["no.such.Module", "Linear", "torch.nn.functional.relu", int])
def test_shard_modules_that_are_not_module_classes_are_refused(entry):
    with pytest.raises(MisconfigurationError, match="shard_modules"):
        FSDPStrategy(accelerator="cpu", shard_modules=[entry])


def test_state_dict_type_must_be_known():
    with pytest.raises(MisconfigurationError, match="state_dict_type"):
        FSDPStrategy(accelerator="cpu", state_dict_type="consolidated")


def test_fp16_mixed_precision_is_refused_on_cuda(monkeypatch):
    if not torch.cuda.is_available():  # the check runs at construction: a pretend CUDA machine is enough
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MisconfigurationError, match="16-mixed"):
        FSDPStrategy(accelerator="cuda", precision="16-mixed")
    assert FSDPStrategy(accelerator="cuda", precision="bf16-mixed").precision.precision == "bf16-mixed"


def test_fp16_mixed_precision_on_cpu_falls_back_to_bf16_as_everywhere_on_cpu():
    # On the CPU, '16-mixed' becomes 'bf16-mixed' before FSDP looks (Lightning's rule, with its warning).
    with pytest.warns(UserWarning, match="Using precision='bf16-mixed' instead"):
        strategy = FSDPStrategy(accelerator="cpu", precision="16-mixed")
    assert strategy.precision.precision == "bf16-mixed"
    assert FSDPStrategy(accelerator="cpu", precision="bf16-mixed").precision.precision == "bf16-mixed"
