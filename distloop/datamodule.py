"""DataModule: where the data for each stage comes from."""

from __future__ import annotations

from typing import Any


class DataModule:
    """Override ``setup`` and the ``*_dataloader`` methods a run needs.

    ``setup(stage)`` is called on every rank with ``"fit"``, ``"validate"``, ``"test"``
    or ``"predict"`` before the dataloaders are asked for.
    """

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
