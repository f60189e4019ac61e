"""The `distloop` command end to end, as a subprocess."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _commands import run

pytestmark = pytest.mark.e2e


def distloop(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    flags = [a for a in args if a.startswith("--")]
    overrides = [a for a in args if not a.startswith("--")]
    return run([sys.executable, "-m", "distloop", *flags, f"hydra.run.dir={tmp_path / 'run'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides], timeout, cwd=tmp_path, env=env)


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_default_job_trains_digits_to_95_percent(tmp_path):
    result = distloop(tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    rows = read_metrics(run)
    val_acc = [float(r["val_acc"]) for r in rows if r.get("val_acc")]
    assert val_acc[-1] >= 0.95
    assert any(r.get("test_acc") for r in rows)
    assert (run / "config.yaml").exists() and (run / "hparams.yaml").exists()
    assert "max_epochs: 20" in (run / "config.yaml").read_text()
    assert "Epoch 0:" in result.stderr  # progress is shown


def test_overrides_and_multirun(tmp_path):
    result = distloop(tmp_path, "trainer.max_epochs=1", "model.hidden=16", "logger=none", "test_after_fit=false")
    assert result.returncode == 0, result.stderr
    assert "Epoch 0:" in result.stderr and "Epoch 1:" not in result.stderr
    assert "hidden: 16" in (tmp_path / "run" / "config.yaml").read_text()

    result = distloop(tmp_path, "--multirun", "trainer.max_epochs=1", "model.hidden=8,16", "logger=none",
                      "test_after_fit=false")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


def test_help_lists_the_groups(tmp_path):
    result = distloop(tmp_path, "--help")
    assert result.returncode == 0
    for group in ("trainer:", "strategy:", "model:", "data:", "callbacks:", "logger:"):
        assert group in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=nope"], "Could not find 'model/nope'"),
        (["~model._target_"], "The `model` config needs a `_target_`"),
        (["trainer.max_epochs=-2"], "max_epochs=-2 must be an int >= -1"),
        (["strategy.name=deepspeed"], "strategy.name='deepspeed' is not known"),
        (["+trainer.unknown=1"], "Bad `trainer` config"),
        (["model._target_=distloop.examples.digits.Missing"], "Could not build `model`"),
    ],
)
def test_bad_input_gives_a_message_not_a_traceback(tmp_path, args, message):
    result = distloop(tmp_path, *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
