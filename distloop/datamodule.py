"""DataModule: where the data for each stage comes from."""

from __future__ import annotations

import os
from typing import IO, Any, TypeVar

from distloop.hparams import HyperparametersMixin, load_datamodule

_D = TypeVar("_D", bound="DataModule")


class DataModule(HyperparametersMixin):
    """Override ``setup`` and the ``*_dataloader`` methods a run needs.

    ``prepare_data()`` runs first, once per node (local rank zero) or, with
    ``prepare_data_per_node = False``, once per job (global rank zero), then every rank
    waits; ``setup(stage)`` is then called on every rank with ``"fit"``, ``"validate"``,
    ``"test"`` or ``"predict"`` before the dataloaders are asked for. ``self.trainer`` is the
    Trainer running it, as in Lightning.
    """

    prepare_data_per_node: bool = True
    trainer: Any = None

    @classmethod
    def load_from_checkpoint(
        cls: type[_D],
        checkpoint_path: str | os.PathLike | IO,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> _D:
        """The datamodule a checkpoint was saved with, as Lightning's: ``cls(**datamodule_hparams)``
        (the checkpoint's ``datamodule_hyper_parameters``), ``kwargs`` overriding them."""
        return load_datamodule(cls, checkpoint_path, map_location, hparams_file, weights_only, **kwargs)

    def prepare_data(self) -> None:
        """Download or write files once (per node, or per job): not on every rank, and set no state here."""

    def setup(self, stage: str) -> None:
        """Load or split the data for ``stage``."""

    def teardown(self, stage: str) -> None:
        """Release what ``setup`` took."""

    def train_dataloader(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no train_dataloader()")

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no test_dataloader()")

    def predict_dataloader(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no predict_dataloader()")
