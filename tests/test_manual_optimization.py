"""Manual optimization and several optimizers, written as a Lightning user writes a GAN."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import Callback, LoopModule, MisconfigurationError, ModelCheckpoint, Trainer
from distloop.checkpoint import load, newest_valid
from distloop.optim import LoopOptimizer, NoOptimizer, parse_optimizers
from resume_helpers import CrashAt


def gan_data(n: int = 32) -> TensorDataset:
    """(sample id, real sample, latent): the latent comes with the data, so a run can be replayed by hand."""
    g = torch.Generator().manual_seed(7)
    real = torch.randn(n, 4, generator=g) * 0.5 + 1.0
    return TensorDataset(torch.arange(n), real, torch.randn(n, 2, generator=g))


def gan_loader(batch_size: int = 4, shuffle: bool = True) -> DataLoader:
    return DataLoader(gan_data(), batch_size=batch_size, shuffle=shuffle)


def g_loss_of(gan: GAN, z: torch.Tensor) -> torch.Tensor:
    logits = gan.discriminator(gan.generator(z))
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


def d_loss_of(gan: GAN, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    real_logits, fake_logits = gan.discriminator(real), gan.discriminator(gan.generator(z).detach())
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))) / 2


class GAN(LoopModule):
    """Lightning's GAN recipe: two optimizers, each step toggled, backward and stepped by hand."""

    def __init__(self, dropout: float = 0.0, norm: bool = False, clip: float | None = None,
                 toggle: str = "toggle_optimizer") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.toggle = toggle
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8) if norm else nn.Identity(),
                                           nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(8, 1))
        self.clip = clip
        self.seen: list[list[int]] = []
        self.running_means: list[torch.Tensor] = []  # the discriminator's norm buffer as each step starts
        self.d_had_grad_after_g_step: list[bool] = []

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:  # no batch_idx: Lightning allows it
        ids, real, z = batch
        self.seen.append(ids.tolist())
        if isinstance(self.discriminator[1], nn.BatchNorm1d):
            self.running_means.append(self.discriminator[1].running_mean.clone())
        opt_g, opt_d = self.optimizers()

        with self.toggled(opt_g):
            g_loss = g_loss_of(self, z)
            self.manual_backward(g_loss)
            opt_g.step()
            opt_g.zero_grad()
        self.d_had_grad_after_g_step.append(any(p.grad is not None for p in self.discriminator.parameters()))

        self.toggle_optimizer(opt_d)
        d_loss = d_loss_of(self, real, z)
        self.manual_backward(d_loss)
        if self.clip is not None:
            self.clip_gradients(opt_d, gradient_clip_val=self.clip, gradient_clip_algorithm="norm")
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss}, prog_bar=True)
        return {"loss": d_loss, "g_loss": g_loss}

    @contextlib.contextmanager
    def toggled(self, opt: Any) -> Iterator[None]:
        """The generator's step, toggled in one of Lightning's three ways."""
        if self.toggle == "toggle_optimizer":
            self.toggle_optimizer(opt)
            yield
            self.untoggle_optimizer(opt)
        else:
            with self.toggled_optimizer(opt) if self.toggle == "toggled_optimizer" else opt.toggle_model():
                yield

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=0.01, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=0.01, betas=(0.5, 0.999))
        return [opt_g, opt_d], []


def make_trainer(**kwargs: Any) -> Trainer:
    kwargs = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
              "enable_checkpointing": False, "accelerator": "cpu", "num_sanity_val_steps": 0, **kwargs}
    return Trainer(**kwargs)


class BatchEnds(Callback):
    def __init__(self) -> None:
        self.outputs: list[Any] = []
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.outputs.append(outputs)
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("toggle", ["toggle_optimizer", "toggled_optimizer", "toggle_model"])
def test_gan_steps_both_optimizers_and_counts_two_global_steps_per_batch(toggle):
    torch.manual_seed(0)
    gan, ends = GAN(toggle=toggle), BatchEnds()
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    trainer = make_trainer(max_epochs=2, callbacks=[ends])
    trainer.fit(gan, gan_loader())
    assert trainer.global_step == 2 * 2 * 8  # Lightning: every optimizer step is a global step
    assert ends.steps[:3] == [2, 4, 6]
    assert not any(gan.d_had_grad_after_g_step)  # toggled: the generator's loss left D without gradients
    assert all(p.requires_grad for p in gan.parameters())  # and untoggled
    for name, value in gan.state_dict().items():
        assert not torch.equal(value, before[name]), name
    out = ends.outputs[0]
    assert set(out) == {"loss", "g_loss"} and not out["loss"].requires_grad  # the loss arrives detached
    assert isinstance(trainer.optimizers[0], torch.optim.Adam) and len(trainer.optimizers) == 2


def test_max_steps_counts_optimizer_steps():
    trainer = make_trainer(max_steps=6)
    trainer.fit(GAN(), gan_loader())
    assert trainer.global_step == 6  # three batches of two steps


class OneOptimizer(LoopModule):
    """One optimizer stepped by hand; records what the hooks saw."""

    def __init__(self, closure: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.layer = nn.Linear(4, 1)
        self.closure = closure
        self.calls: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()

        def closure() -> torch.Tensor:
            self.calls.append("closure")
            loss = F.mse_loss(self.layer(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            return loss

        if self.closure:
            opt.step(closure=closure)
        else:
            closure()
            opt.step()

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.calls.append("on_before_backward")

    def on_after_backward(self) -> None:
        self.calls.append("on_after_backward")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        assert not isinstance(optimizer, LoopOptimizer)  # the hook gets the torch optimizer, as in Lightning
        self.calls.append("on_before_optimizer_step")

    def on_before_zero_grad(self, optimizer: Any) -> None:
        self.calls.append("on_before_zero_grad")  # automatic optimization only

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression(n: int = 16, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [(x[i:i + batch], x[i:i + batch].sum(1, keepdim=True)) for i in range(0, n, batch)]


@pytest.mark.parametrize("closure", [False, True])
def test_hooks_run_in_lightnings_order_and_training_step_may_return_none(closure):
    module = OneOptimizer(closure)
    trainer = make_trainer()
    trainer.fit(module, regression())
    assert trainer.global_step == 4
    assert module.calls[:4] == ["closure", "on_before_backward", "on_after_backward", "on_before_optimizer_step"]
    assert len(module.calls) == 4 * 4


def test_steps_outside_training_step_are_not_global_steps():
    class StepsAtBatchEnd(OneOptimizer):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.optimizers().step()  # still hooked, but Lightning counts steps in training_step only

    module = StepsAtBatchEnd()
    trainer = make_trainer()
    trainer.fit(module, regression())
    assert trainer.global_step == 4
    assert module.calls.count("on_before_optimizer_step") == 8


def test_lr_schedulers_are_the_users_to_step():
    class Scheduled(GAN):
        def configure_optimizers(self) -> Any:
            (opt_g, opt_d), _ = super().configure_optimizers()
            return [{"optimizer": opt_g, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt_g, 1, 0.5),
                                                          "interval": "step", "name": "g"}},
                    {"optimizer": opt_d, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt_d, 1, 0.5)}]

        def on_train_epoch_end(self) -> None:
            self.lr_schedulers()[1].step()  # the discriminator's, once an epoch; the generator's never

    module = Scheduled()
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, gan_loader())
    opt_g, opt_d = module.optimizers()
    assert opt_g.param_groups[0]["lr"] == 0.01  # interval="step", yet never stepped for the user
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 2)
    assert [c.name for c in trainer.lr_scheduler_configs] == ["g", None]


def test_clip_gradients_by_norm_and_by_value():
    norms: list[float] = []

    class Clipped(OneOptimizer):
        def __init__(self, algorithm: str) -> None:
            super().__init__()
            self.algorithm = algorithm

        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            opt = self.optimizers()
            self.manual_backward(100 * F.mse_loss(self.layer(x), y))
            self.clip_gradients(opt, gradient_clip_val=0.5, gradient_clip_algorithm=self.algorithm)
            grads = torch.cat([p.grad.reshape(-1) for p in self.parameters()])
            norms.append(float(grads.norm() if self.algorithm == "norm" else grads.abs().max()))
            opt.step()
            opt.zero_grad()

    for algorithm in ("norm", "value"):
        norms.clear()
        make_trainer().fit(Clipped(algorithm), regression())
        assert norms == pytest.approx([0.5] * 4)  # every step's gradients were larger, and were clipped


@pytest.mark.parametrize("clip", [False, True])
def test_manual_steps_go_through_the_grad_scaler_unscaled_once(clip):
    seen: dict[bool, list[torch.Tensor]] = {}

    class Scaled(OneOptimizer):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            opt = self.optimizers()
            self.manual_backward(F.mse_loss(self.layer(x), y))
            if clip:
                self.clip_gradients(opt, gradient_clip_val=1e6)  # unscales first; too large to clip
            opt.step()
            opt.zero_grad()

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            seen.setdefault(self.scaled, []).append(self.layer.weight.grad.clone())

    weights = {}
    for scaled in (False, True):
        module = Scaled()
        module.scaled = scaled
        trainer = make_trainer()
        if scaled:  # what precision="16-mixed" uses on CUDA, on the CPU here
            trainer.strategy.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        trainer.fit(module, regression())
        weights[scaled] = module.layer.weight.detach().clone()
    assert_same(seen[True], seen[False])  # the hook sees true-size gradients, unscaled once
    assert torch.equal(weights[True], weights[False])


class Linear(LoopModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = not manual
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_training_step_without_batch_idx_trains():
    module = Linear()
    before = module.layer.weight.detach().clone()
    trainer = make_trainer()
    trainer.fit(module, regression())
    assert trainer.global_step == 4 and not torch.equal(module.layer.weight, before)


class TwoOptimizers(Linear):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())]


class ManualBackwardInAutomatic(Linear):
    def training_step(self, batch: Any) -> torch.Tensor:
        loss = super().training_step(batch)
        self.manual_backward(loss)
        return loss


class ReturnsAString(Linear):
    def training_step(self, batch: Any) -> str:
        return "done"


class TakesOptimizerIdx(Linear):
    def training_step(self, batch: Any, batch_idx: int, optimizer_idx: int) -> torch.Tensor:
        return super().training_step(batch)


@pytest.mark.parametrize("module, trainer_args, match", [
    (TwoOptimizers(), {}, "automatic_optimization = False"),
    (ManualBackwardInAutomatic(), {}, "manual_backward is for manual optimization"),
    (Linear(manual=True), {"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
    (Linear(manual=True), {"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
    (ReturnsAString(manual=True), {}, "returned str"),
    (TakesOptimizerIdx(), {}, "optimizer_idx"),
])
def test_misuse_says_what_to_change(module, trainer_args, match):
    with pytest.raises(MisconfigurationError, match=match):
        make_trainer(**trainer_args).fit(module, regression())


def test_optimizers_follow_lightnings_single_or_list_rule():
    seen: dict[str, Any] = {}

    class Inspects(OneOptimizer):
        def on_train_start(self) -> None:
            opt = self.optimizers()
            seen.update(wrapped=opt, raw=self.optimizers(use_pl_optimizer=False), schedulers=self.lr_schedulers())

    module = Inspects()
    make_trainer(max_steps=1).fit(module, regression())
    wrapped, raw = seen["wrapped"], seen["raw"]
    assert isinstance(wrapped, LoopOptimizer) and isinstance(wrapped, torch.optim.SGD)
    assert type(raw) is torch.optim.SGD and wrapped.optimizer is raw
    assert wrapped.param_groups is raw.param_groups and wrapped.state is raw.state
    assert wrapped.defaults["lr"] == 0.1 and wrapped.state_dict() == raw.state_dict()
    assert seen["schedulers"] is None
    gan = GAN()
    make_trainer(max_steps=2).fit(gan, gan_loader())
    assert isinstance(gan.optimizers(), list) and len(gan.optimizers()) == 2


def params(n: int = 3) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(2)) for _ in range(n)]


def sgd(p: nn.Parameter) -> torch.optim.SGD:
    return torch.optim.SGD([p], lr=0.1)


def every_form() -> list[tuple[str, Any, int, int]]:
    a, b = params(2)
    oa, ob = sgd(a), sgd(b)
    sa, sb = torch.optim.lr_scheduler.StepLR(oa, 1), torch.optim.lr_scheduler.StepLR(ob, 1)
    return [
        ("one optimizer", oa, 1, 0),
        ("a list", [oa, ob], 2, 0),
        ("a tuple", (oa, ob), 2, 0),
        ("two lists", ([oa, ob], [sa, sb]), 2, 2),
        ("a list and one scheduler", ([oa, ob], sa), 2, 1),
        ("a dict", {"optimizer": oa}, 1, 0),
        ("a dict with a scheduler", {"optimizer": oa, "lr_scheduler": sa}, 1, 1),
        ("dicts, each with its scheduler", [{"optimizer": oa, "lr_scheduler": sa},
                                            {"optimizer": ob, "lr_scheduler": {"scheduler": sb, "interval": "step"}}],
         2, 2),
        ("a tuple of dicts, one without", ({"optimizer": oa, "lr_scheduler": sa}, {"optimizer": ob}), 2, 1),
    ]


@pytest.mark.parametrize("form", every_form(), ids=lambda f: f[0])
def test_every_configure_optimizers_form_parses(form):
    _, config, n_optimizers, n_schedulers = form
    setup = parse_optimizers(config, automatic_optimization=False)
    assert len(setup.optimizers) == n_optimizers and len(setup.lr_scheduler_configs) == n_schedulers
    assert all(isinstance(o, torch.optim.SGD) for o in setup.optimizers)
    if n_optimizers > 1:
        with pytest.raises(MisconfigurationError, match="manual optimization"):
            parse_optimizers(config, automatic_optimization=True)


def test_scheduler_dicts_take_lightnings_keys_and_defaults():
    (p,) = params(1)
    opt = sgd(p)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    full = {"scheduler": plateau, "interval": "step", "frequency": 3, "monitor": "val_loss", "name": "lr",
            "strict": False}
    (config,) = parse_optimizers({"optimizer": opt, "lr_scheduler": full}).lr_scheduler_configs
    assert (config.interval, config.frequency, config.monitor, config.name, config.strict,
            config.reduce_on_plateau) == ("step", 3, "val_loss", "lr", False, True)
    (config,) = parse_optimizers({"optimizer": opt, "lr_scheduler": plateau, "monitor": "loss"}).lr_scheduler_configs
    assert (config.interval, config.frequency, config.monitor, config.strict) == ("epoch", 1, "loss", True)
    with pytest.raises(MisconfigurationError, match="monitor"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": plateau})
    with pytest.raises(MisconfigurationError, match="interval"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "interval": "batch"}})
    with pytest.warns(RuntimeWarning, match="manual optimization ignores"):
        (config,) = parse_optimizers({"optimizer": opt, "lr_scheduler": full},
                                     automatic_optimization=False).lr_scheduler_configs
    assert config.monitor is None and config.interval == "step"  # kept as a record, not used
    other = sgd(params(1)[0])
    with pytest.raises(MisconfigurationError, match="did not return"):
        parse_optimizers(([opt], [torch.optim.lr_scheduler.StepLR(other, 1)]))
    with pytest.raises(MisconfigurationError, match="accepted forms"):
        parse_optimizers("adam")
    with pytest.warns(UserWarning, match="without an optimizer"):
        assert isinstance(parse_optimizers(None).optimizers[0], NoOptimizer)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts, lists and tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class ScheduledGAN(GAN):
    """With dropout (the random streams matter), a norm buffer, clipping, and one scheduler per optimizer."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(dropout=0.3, norm=True, clip=1.0)

    def configure_optimizers(self) -> Any:
        (opt_g, opt_d), _ = super().configure_optimizers()
        return [opt_g, opt_d], [torch.optim.lr_scheduler.StepLR(opt_g, 3), torch.optim.lr_scheduler.StepLR(opt_d, 5)]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        for scheduler in self.lr_schedulers():
            scheduler.step()


def fit_resumable(root: str, *callbacks: Callback, ckpt_path: str | None = None, **kwargs: Any) -> tuple[Trainer, GAN]:
    """Fit ``ScheduledGAN`` with a checkpoint every 4 optimizer steps (every other batch); a crash is caught."""
    checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(default_root_dir=root, max_epochs=2, seed=3, deterministic=True, enable_checkpointing=True,
                           callbacks=[checkpoint, *callbacks], **kwargs)
    gan = ScheduledGAN()
    try:
        trainer.fit(gan, gan_loader(), ckpt_path=ckpt_path)
    except RuntimeError as err:
        if "crash at step" not in str(err):
            raise
    return trainer, gan


def run_result(trainer: Trainer, gan: GAN) -> dict[str, Any]:
    return {"step": trainer.global_step, "state": gan.state_dict(),
            "optimizers": [o.state_dict() for o in trainer.optimizers],
            "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]}


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # the resumed run's
def test_checkpoint_holds_both_optimizers_and_resume_is_bitwise(tmp_path):
    full = run_result(*fit_resumable(str(tmp_path / "full")))
    fit_resumable(str(tmp_path / "run"), CrashAt(10))  # mid-epoch; the last checkpoint is step 8's
    checkpoint = load(newest_valid([str(tmp_path / "run" / "checkpoints")])[0])
    assert checkpoint["global_step"] == 8
    assert len(checkpoint["optimizer_states"]) == 2 and len(checkpoint["lr_schedulers"]) == 2
    assert all(s["state"] for s in checkpoint["optimizer_states"])  # both Adams have moments to restore
    resumed = run_result(*fit_resumable(str(tmp_path / "run"), ckpt_path="last"))
    assert full["step"] == 2 * 2 * 8
    assert_same(resumed, full)


# ----------------------------------------------------------------------- two gloo ranks


def _fit_gan_on_rank(rank: int, world_size: int, root: str, out: str, crash_at: int, ckpt_path: str | None) -> None:
    torch.manual_seed(rank)  # each rank builds other weights: rank 0's must reach every rank
    gan = GAN(norm=True)
    checkpoint = ModelCheckpoint(dirpath=f"{root}/checkpoints", every_n_train_steps=4, save_top_k=-1)
    callbacks = [checkpoint, CrashAt(crash_at)] if crash_at else [checkpoint]
    trainer = make_trainer(default_root_dir=root, strategy="ddp", max_epochs=2, seed=3, enable_checkpointing=True,
                           callbacks=callbacks)
    initial = {k: v.clone() for k, v in gan.state_dict().items()}
    try:
        trainer.fit(gan, gan_loader(), ckpt_path=ckpt_path)
    except RuntimeError as err:
        if "crash at step" not in str(err):
            raise
    torch.save({**run_result(trainer, gan), "initial": initial, "seen": gan.seen,
                "running_means": gan.running_means, "d_had_grad": gan.d_had_grad_after_g_step},
               f"{out}-rank{rank}.pt")


def run_ranks(root: Any, name: str, crash_at: int = 0, ckpt_path: str | None = None) -> list[dict[str, Any]]:
    spawn(_fit_gan_on_rank, 2, str(root), str(root / name), crash_at, ckpt_path, init=False, timeout=240)
    return [torch.load(f"{root / name}-rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def two_rank_gan(tmp_path_factory):
    root = tmp_path_factory.mktemp("gan2")
    return run_ranks(root, "full")


def replay_with_averaged_gradients(initial: dict[str, torch.Tensor], seen: list[list[list[int]]]) -> GAN:
    """The 2-rank run by hand in one process: at each optimizer step, each rank's gradient on its own
    batch, averaged as DDP averages (each halved, then summed), then one Adam step."""
    torch.manual_seed(0)
    gan = GAN(norm=True)
    gan.load_state_dict(initial)
    opt_g, opt_d = gan.configure_optimizers()[0]
    data = gan_data()
    g_params, d_params = list(gan.generator.parameters()), list(gan.discriminator.parameters())
    for step_ids in zip(*seen):
        batches = [data[torch.tensor(ids)] for ids in step_ids]
        for opt, params_, loss_of in ((opt_g, g_params, lambda b: g_loss_of(gan, b[2])),
                                      (opt_d, d_params, lambda b: d_loss_of(gan, b[1], b[2]))):
            per_rank = [torch.autograd.grad(loss_of(b), params_) for b in batches]
            for p, grads in zip(params_, zip(*per_rank)):
                p.grad = grads[0] * 0.5 + grads[1] * 0.5
            opt.step()
            opt.zero_grad()
    return gan


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ddp_gan_averages_gradients_over_ranks(two_rank_gan):
    rank0, rank1 = two_rank_gan
    assert rank0["step"] == rank1["step"] == 2 * 2 * 4  # 16 samples per rank and epoch, batches of 4
    assert not torch.equal(rank0["initial"]["generator.0.weight"], rank1["initial"]["generator.0.weight"])
    names = [name for name, _ in GAN(norm=True).named_parameters()]
    assert_same([rank0["state"][n] for n in names], [rank1["state"][n] for n in names])  # buffers: each rank's last step
    assert_same(rank0["optimizers"], rank1["optimizers"])
    assert sorted(i for r in two_rank_gan for ids in r["seen"][:4] for i in ids) == list(range(32))
    assert not any(rank0["d_had_grad"])  # toggled: no find_unused_parameters needed, none synced for D
    # Buffers start every step as rank 0 has them (DDP's broadcast_buffers), though the ranks' batches differ.
    assert_same(rank0["running_means"], rank1["running_means"])
    assert not torch.equal(rank0["running_means"][-1], rank0["running_means"][-2])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran
    try:
        replayed = replay_with_averaged_gradients(rank0["initial"], [rank0["seen"], rank1["seen"]])
    finally:
        torch.set_num_threads(threads)
    for name, value in replayed.named_parameters():
        assert torch.equal(rank0["state"][name], value.detach()), name


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_ddp_gan_crash_and_resume_is_bitwise(tmp_path, two_rank_gan):
    run_ranks(tmp_path, "crash", crash_at=14)  # mid-epoch 1 (8 steps an epoch); the last checkpoint is step 12's
    assert load(newest_valid([str(tmp_path / "checkpoints")])[0])["global_step"] == 12
    resumed = run_ranks(tmp_path, "resumed", ckpt_path="last")
    for rank in range(2):
        for part in ("step", "state", "optimizers"):
            assert_same(resumed[rank][part], two_rank_gan[rank][part], f"rank {rank} {part}")
