"""Hyperparameters as in Lightning (distloop/hparams.py): ``save_hyperparameters``, the checkpoint's
plain-data ``hyper_parameters``, ``load_from_checkpoint`` and what the loggers get."""

from __future__ import annotations

import functools
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distloop import CheckpointError, DataModule, LoopModule, MisconfigurationError, Trainer
from distloop.hparams import merged_hparams


def batches(n: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 4, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


class Trains(LoopModule):
    """Fits ``self.net`` with SGD at ``self.hparams.lr``: what each module below shares."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Regressor(Trains):
    """The usual Lightning module: every ``__init__`` argument saved, the optimizer read from them."""

    def __init__(self, hidden: int = 8, lr: float = 0.1,
                 optimizer: Callable[..., torch.optim.Optimizer] = functools.partial(torch.optim.SGD, momentum=0.9),
                 activation: type[nn.Module] = nn.Tanh) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, hidden), activation(), nn.Linear(hidden, 1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.hparams.optimizer(self.parameters(), lr=self.hparams.lr)


class Deeper(Regressor):
    """A subclass passing its base class's arguments on through ``**kwargs``."""

    def __init__(self, depth: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.depth = depth


class WithBackbone(Trains):
    """An ``nn.Module`` argument: its weights are in the state_dict, not in the hparams."""

    def __init__(self, backbone: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(backbone, nn.Linear(4, 1))


class LegacyHparams(Trains):
    """Lightning's older style: one ``hparams`` dict argument, saved as the hparams."""

    def __init__(self, hparams: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters(hparams)
        self.net = nn.Linear(4, 1)


class Data(DataModule):
    """A datamodule saving its own arguments, as a ``LightningDataModule`` does."""

    def __init__(self, batch_size: int = 8, num_batches: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.hparams.num_batches, self.hparams.batch_size)


def fit_and_save(tmp_path: Path, module: LoopModule, datamodule: DataModule | None = None,
                 weights_only: bool = False) -> Path:
    trainer = Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False)
    if datamodule is None:
        trainer.fit(module, batches())
    else:
        trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path, weights_only=weights_only)
    return path


# ------------------------------------------------------------ save_hyperparameters
def test_every_init_argument_is_saved_with_its_default_or_given_value() -> None:
    """``self.hparams`` is what ``__init__`` was called with, by attribute and by key."""
    module = Regressor(hidden=16)
    assert set(module.hparams) == {"hidden", "lr", "optimizer", "activation"}
    assert module.hparams.hidden == module.hparams["hidden"] == 16
    assert module.hparams.lr == 0.1 and module.hparams.activation is nn.Tanh


def test_hparams_initial_keeps_the_first_values() -> None:
    """The loggers get ``hparams_initial``: changing ``hparams`` later must not alter it."""
    module = Regressor(lr=0.1)
    module.hparams.lr = 0.7
    assert module.hparams.lr == 0.7
    assert module.hparams_initial.lr == 0.1


def test_ignore_takes_a_name_or_names() -> None:
    """``ignore=`` leaves those arguments out, whether one string or a list."""

    class Ignoring(LoopModule):
        def __init__(self, lr: float = 0.1, verbose: bool = False, seed: int = 0) -> None:
            super().__init__()
            self.save_hyperparameters(ignore=["verbose", "seed"] if verbose else "seed")

    assert dict(Ignoring(verbose=True).hparams) == {"lr": 0.1}
    assert dict(Ignoring().hparams) == {"lr": 0.1, "verbose": False}


def test_names_select_the_arguments_to_save() -> None:
    """``save_hyperparameters("a", "c")`` keeps only those; a name that is no argument is an error."""

    class Selecting(LoopModule):
        def __init__(self, a: int = 1, b: int = 2, c: int = 3, select: tuple[str, ...] = ("a", "c")) -> None:
            super().__init__()
            self.save_hyperparameters(*select)

    assert dict(Selecting().hparams) == {"a": 1, "c": 3}
    with pytest.raises(KeyError, match="nope"):
        Selecting(select=("a", "nope"))


def test_a_subclass_chain_saves_every_level_with_the_outermost_values() -> None:
    """As Lightning's collect_init_args: the base class's call sees the subclass's arguments too."""
    module = Deeper(depth=3, lr=0.2)
    assert module.hparams.depth == 3 and module.hparams.lr == 0.2 and module.hparams.hidden == 8
    assert set(module.hparams) == {"depth", "hidden", "lr", "optimizer", "activation"}


def test_star_args_are_left_out_and_star_kwargs_included() -> None:
    """Lightning drops ``*args`` values and merges ``**kwargs`` items into the hparams."""

    class Variadic(LoopModule):
        def __init__(self, lr: float, *args: Any, **kwargs: Any) -> None:
            super().__init__()
            self.save_hyperparameters()

    assert dict(Variadic(0.1, "extra", width=3).hparams) == {"lr": 0.1, "width": 3}


@dataclass
class Config:
    lr: float = 0.1
    width: int = 4


@pytest.mark.parametrize("config", [{"lr": 0.1, "width": 4}, Namespace(lr=0.1, width=4), Config()],
                         ids=["dict", "Namespace", "dataclass"])
def test_a_single_config_object_is_saved_as_the_hparams(config: Any) -> None:
    """The config's items become the hparams (not one hparam named after the argument)."""

    class Configured(LoopModule):
        def __init__(self, cfg: Any) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)

    module = Configured(config)
    assert dict(module.hparams) == {"lr": 0.1, "width": 4}
    assert module.hparams.width == 4


def test_a_module_argument_is_kept_with_a_warning_to_ignore_it() -> None:
    """Lightning warns that an ``nn.Module`` hparam should be ignored, and keeps it in ``hparams``."""
    backbone = nn.Linear(4, 4)
    with pytest.warns(UserWarning, match=r"'backbone' is an `nn.Module`.*ignore=\['backbone'\]"):
        module = WithBackbone(backbone)
    assert module.hparams.backbone is backbone and module.hparams.lr == 0.1


def test_a_datamodule_saves_its_arguments() -> None:
    """``DataModule`` has the same mixin."""
    assert dict(Data(batch_size=4).hparams) == {"batch_size": 4, "num_batches": 4}


# ------------------------------------------------------------ checkpoints and load_from_checkpoint
def test_the_checkpoint_holds_the_hparams_as_plain_data(tmp_path: Path) -> None:
    """``weights_only=True`` reads them; a partial and a class are records of their import paths."""
    path = fit_and_save(tmp_path, Regressor(hidden=6, lr=0.05))
    saved = torch.load(path, weights_only=True)
    assert saved["hyper_parameters"] == {
        "hidden": 6, "lr": 0.05,
        "optimizer": {"_partial_": "torch.optim.sgd:SGD", "args": [], "keywords": {"momentum": 0.9}},
        "activation": {"_import_": "torch.nn.modules.activation:Tanh"},
    }
    assert saved["datamodule_hyper_parameters"] == {}


def test_load_from_checkpoint_rebuilds_the_trained_module(tmp_path: Path) -> None:
    """Same class, hparams and weights; in training mode, as Lightning returns it."""
    trained = Regressor(hidden=6, lr=0.05)
    path = fit_and_save(tmp_path, trained)
    loaded = Regressor.load_from_checkpoint(path)
    assert type(loaded) is Regressor and loaded.training
    assert loaded.hparams.hidden == 6 and loaded.hparams.lr == 0.05 and loaded.net[0].out_features == 6
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_keyword_arguments_override_the_saved_hparams(tmp_path: Path) -> None:
    """``load_from_checkpoint(path, lr=0.5)``: the module is built with ``lr=0.5``."""
    path = fit_and_save(tmp_path, Regressor(lr=0.05))
    assert Regressor.load_from_checkpoint(path, lr=0.5).hparams.lr == 0.5


def test_a_partial_and_a_class_hparam_round_trip(tmp_path: Path) -> None:
    """They are rebuilt from their import paths, so the loaded module trains the same way."""
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    path = fit_and_save(tmp_path, Regressor(optimizer=adam, activation=nn.ReLU))
    loaded = Regressor.load_from_checkpoint(path)
    optimizer = loaded.hparams.optimizer
    assert isinstance(optimizer, functools.partial)
    assert optimizer.func is torch.optim.Adam and optimizer.args == () and optimizer.keywords == {"lr": 1e-3}
    assert loaded.hparams.activation is nn.ReLU and isinstance(loaded.net[1], nn.ReLU)


def test_a_subclass_chain_loads_back(tmp_path: Path) -> None:
    """Every level's arguments reach ``cls(**hparams)``, through ``**kwargs`` too."""
    path = fit_and_save(tmp_path, Deeper(depth=3, hidden=5))
    loaded = Deeper.load_from_checkpoint(path)
    assert loaded.depth == 3 and loaded.hparams.hidden == 5


def test_legacy_single_hparams_argument_loads_back(tmp_path: Path) -> None:
    """The saved dict is passed back as the ``hparams`` argument (Lightning's ``hparams_name``)."""
    path = fit_and_save(tmp_path, LegacyHparams({"lr": 0.05, "note": "x"}))
    assert torch.load(path, weights_only=True)["hparams_name"] == "hparams"
    loaded = LegacyHparams.load_from_checkpoint(path, lr=0.2)
    assert dict(loaded.hparams) == {"lr": 0.2, "note": "x"}


def test_a_weights_only_checkpoint_loads_back(tmp_path: Path) -> None:
    """It keeps the hparams and ``hparams_name``, all ``load_from_checkpoint`` needs."""
    path = fit_and_save(tmp_path, LegacyHparams({"lr": 0.05}), weights_only=True)
    assert "optimizer_states" not in torch.load(path, weights_only=True)
    assert dict(LegacyHparams.load_from_checkpoint(path).hparams) == {"lr": 0.05}


def test_a_missing_required_argument_is_named(tmp_path: Path) -> None:
    """The left-out ``nn.Module`` must be passed: the error names it; passing it loads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = fit_and_save(tmp_path, WithBackbone(nn.Linear(4, 4), lr=0.2))
    with pytest.raises(MisconfigurationError, match=r"\['backbone'\].*backbone=\.\.\."):
        WithBackbone.load_from_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = WithBackbone.load_from_checkpoint(path, backbone=nn.Linear(4, 4))
    assert loaded.hparams.lr == 0.2


def test_an_object_that_is_not_plain_data_is_left_out_with_a_warning(tmp_path: Path) -> None:
    """The checkpoint stays weights-only loadable; the warning says to pass the value when loading."""

    class Scaled(Regressor):
        def __init__(self, scale: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)

    with pytest.warns(UserWarning, match=r"'scale'.*load_from_checkpoint\(path, scale=\.\.\.\)"):
        path = fit_and_save(tmp_path, Scaled(scale=torch.tensor(2.0)))
    assert "scale" not in torch.load(path, weights_only=True)["hyper_parameters"]


def test_hparams_file_replaces_the_saved_hparams(tmp_path: Path) -> None:
    """Lightning's ``hparams_file``: a YAML file whose values the module is built from."""
    path = fit_and_save(tmp_path, Regressor(lr=0.05))
    hparams_file = tmp_path / "hparams.yaml"
    hparams_file.write_text("hidden: 8\nlr: 0.3\n")
    loaded = Regressor.load_from_checkpoint(path, hparams_file=hparams_file)
    assert loaded.hparams.lr == 0.3 and loaded.hparams.activation is nn.Tanh  # the rest: the defaults


def test_the_datamodule_is_rebuilt_from_its_own_hparams(tmp_path: Path) -> None:
    """``datamodule_hyper_parameters`` holds the datamodule's; kwargs override them."""
    path = fit_and_save(tmp_path, Regressor(), Data(batch_size=4, num_batches=2))
    assert torch.load(path, weights_only=True)["datamodule_hyper_parameters"] == {"batch_size": 4, "num_batches": 2}
    data = Data.load_from_checkpoint(path, num_batches=3)
    assert dict(data.hparams) == {"batch_size": 4, "num_batches": 3}


def test_loading_what_is_no_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    """A missing file, and a torch file that is neither a distloop nor a Lightning checkpoint."""
    with pytest.raises(CheckpointError, match="No checkpoint file"):
        Regressor.load_from_checkpoint(tmp_path / "absent.ckpt")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="neither a distloop checkpoint"):
        Regressor.load_from_checkpoint(other)


# ------------------------------------------------------------ merged_hparams (what the loggers get)
def test_merged_hparams_joins_module_and_datamodule_as_plain_data() -> None:
    """The module's initial hparams and the datamodule's, encoded as in the checkpoint."""
    merged = merged_hparams(Regressor(lr=0.05), Data(batch_size=4))
    assert merged["lr"] == 0.05 and merged["batch_size"] == 4
    assert merged["activation"] == {"_import_": "torch.nn.modules.activation:Tanh"}


def test_merged_hparams_refuses_one_key_with_two_values() -> None:
    """Lightning raises when module and datamodule disagree on a shared key."""

    class Conflicting(DataModule):
        def __init__(self, lr: float = 0.9) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(RuntimeError, match=r"\['lr'\]"):
        merged_hparams(Regressor(lr=0.05), Conflicting())


def test_merged_hparams_leaves_out_what_was_saved_with_logger_false() -> None:
    """``save_hyperparameters(logger=False)`` keeps them out of the loggers only."""

    class Quiet(DataModule):
        def __init__(self, secret: str = "s") -> None:
            super().__init__()
            self.save_hyperparameters(logger=False)

    quiet = Quiet()
    assert quiet.hparams.secret == "s"
    assert "secret" not in merged_hparams(Regressor(), quiet)
