"""Every test runs in its own empty working directory: a Trainer without ``default_root_dir``
writes its checkpoints and logs there, as Lightning's does, never into the repository."""

import pytest


@pytest.fixture(autouse=True)
def _fresh_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
