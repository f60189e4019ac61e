"""Pictures of runs: distloop.plot, `distloop plot`, and curves.png at the end of a run."""

import os
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from _commands import run
from distloop import cli
from distloop.errors import MisconfigurationError
from distloop.loggers import CSVLogger, TensorBoardLogger
from distloop.plot import families, family, find_metrics, plot_runs, read_metrics

# As CSVLogger writes it: sorted columns, a row per logging event, most cells empty.
METRICS = """\
epoch,lr-SGD,step,test_acc,train_loss_epoch,train_loss_step,val_acc,val_loss
,0.1,0,,,,,
0,,9,,,2.0,,
0,,19,,,1.5,,
0,,19,,,,0.6,1.4
0,,19,,1.7,,,
,0.05,20,,,,,
1,,29,,,1.0,,
1,,39,,,0.8,,
1,,39,,,,0.8,0.9
1,,39,,0.9,,,
2,,40,0.82,,,,
"""


def write_run(directory: Path, text: str = METRICS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.csv").write_text(text)
    return directory


def png_size(path: str) -> tuple[int, int]:
    """Width and height from the PNG header (the signature, then the IHDR chunk)."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_read_metrics_gives_each_column_its_steps(tmp_path):
    got = read_metrics(str(write_run(tmp_path / "run")))
    assert got.name == "run" and got.path == str(tmp_path / "run" / "metrics.csv")
    assert sorted(got.series) == ["lr-SGD", "test_acc", "train_loss_epoch", "train_loss_step", "val_acc", "val_loss"]
    assert got.series["train_loss_step"].steps == [9, 19, 29, 39]
    assert got.series["train_loss_epoch"].steps == [19, 39]  # an epoch's value at the step it was logged
    assert got.series["val_loss"].values == [1.4, 0.9]
    assert got.series["test_acc"].values == [0.82]


@pytest.mark.parametrize("metric, expected", [
    ("train_loss_step", "loss"), ("train_loss_epoch", "loss"), ("val_loss", "loss"), ("test_loss", "loss"),
    ("val_acc", "acc"), ("train/acc", "acc"), ("lr-SGD", "lr"), ("lr-Adam/pg2", "lr"),
    ("lr-SGD-momentum", "momentum"), ("grad_norm", "grad_norm"), ("train_", "train_"),
])
def test_family_puts_train_val_and_test_of_a_metric_together(metric, expected):
    assert family(metric) == expected


def test_plot_runs_writes_a_png_with_a_subplot_per_family(tmp_path):
    run_dir = write_run(tmp_path / "run")
    assert list(families([read_metrics(str(run_dir))])) == ["loss", "acc", "lr"]
    out = plot_runs([str(run_dir)], str(tmp_path / "pics" / "curves.png"))  # the folder is made
    assert out == str(tmp_path / "pics" / "curves.png")
    width, height = png_size(out)
    assert width > 2 * height > 600  # three subplots side by side


def test_find_metrics_looks_two_levels_down_and_says_when_it_cannot_choose(tmp_path):
    write_run(tmp_path / "run" / "lightning_logs" / "version_0")
    assert find_metrics(str(tmp_path / "run")) == str(tmp_path / "run" / "lightning_logs" / "version_0" / "metrics.csv")
    write_run(tmp_path / "run" / "lightning_logs" / "version_1")
    with pytest.raises(MisconfigurationError, match="several metrics.csv"):
        find_metrics(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MisconfigurationError, match="holds no metrics.csv"):
        find_metrics(str(tmp_path / "empty"))
    with pytest.raises(MisconfigurationError, match="neither a directory"):
        find_metrics(str(tmp_path / "missing"))


@pytest.mark.parametrize("text", ["", "epoch,step,val_loss\n", "epoch,step,val_loss\n0,9,\n"])
def test_a_csv_without_values_is_a_clear_error(tmp_path, text):
    with pytest.raises(MisconfigurationError, match="no metric values"):
        read_metrics(str(write_run(tmp_path / "run", text)))


def test_a_cell_that_is_not_a_number_names_its_column(tmp_path):
    with pytest.raises(MisconfigurationError, match=r"val_loss='oops' \(row 2\)"):
        read_metrics(str(write_run(tmp_path / "run", "step,val_loss\n3,oops\n")))


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MisconfigurationError, match=r"pip install 'distloop\[matplotlib\]'"):
        plot_runs([str(write_run(tmp_path / "run"))], str(tmp_path / "curves.png"))
    assert not (tmp_path / "curves.png").exists()


def distloop_main(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["distloop", *args])
    cli.main()


def test_plot_command_overlays_two_runs(tmp_path, monkeypatch, capsys):
    first = write_run(tmp_path / "a")
    second = write_run(tmp_path / "b", METRICS.replace("0.9,,,", "1.1,,,"))
    distloop_main(monkeypatch, "plot", str(first), str(second / "metrics.csv"))
    assert png_size("curves.png")[0] > 1000  # the default: curves.png in the current directory
    distloop_main(monkeypatch, "plot", str(first), str(second), "-o", str(tmp_path / "both.png"))
    assert png_size(str(tmp_path / "both.png")) == png_size("curves.png")
    assert f"distloop: wrote {tmp_path / 'both.png'}" in capsys.readouterr().err


def test_plot_command_errors_and_help(tmp_path, monkeypatch, capsys):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SystemExit) as exit_:
        distloop_main(monkeypatch, "plot", str(tmp_path / "nothing"))
    assert exit_.value.code == 2 and "holds no metrics.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        distloop_main(monkeypatch, "plot")
    assert exit_.value.code == 2 and "RUN_DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        distloop_main(monkeypatch, "plot", "--help")
    assert exit_.value.code == 0 and "-o OUTPUT, --output OUTPUT" in capsys.readouterr().out
    assert not os.path.exists("curves.png")


def fake_trainer(log_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(loggers=[CSVLogger(log_dir, name="", version="")])


def test_end_of_run_draws_curves_or_says_why_not(tmp_path, monkeypatch, capsys):
    trainer = fake_trainer(write_run(tmp_path / "run"))
    cli.plot_curves(trainer, str(tmp_path / "run"))
    assert png_size(str(tmp_path / "run" / "curves.png"))[0] > 1000
    assert capsys.readouterr().err == f"distloop: curves {tmp_path / 'run' / 'curves.png'}\n"

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    cli.plot_curves(trainer, str(tmp_path / "run"))  # does not raise: the run trained
    err = capsys.readouterr().err
    assert err.startswith("distloop: warning: no curves.png:") and "pip install 'distloop[matplotlib]'" in err
    assert err.count("\n") == 1

    cli.plot_curves(fake_trainer(tmp_path / "unlogged"), str(tmp_path / "unlogged"))  # no metrics.csv
    assert capsys.readouterr().err == "" and not (tmp_path / "unlogged" / "curves.png").exists()

    cli.plot_curves(SimpleNamespace(loggers=[TensorBoardLogger(tmp_path, name="", version="tb")]), str(tmp_path))
    assert "add the CSV logger" in capsys.readouterr().err and not (tmp_path / "curves.png").exists()


@pytest.mark.e2e
def test_a_distloop_run_ends_with_curves_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = run([sys.executable, "-m", "distloop", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=1",
                  "test_after_fit=false", "callbacks=[lr_monitor]"], 240, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    curves = tmp_path / "run" / "curves.png"
    assert png_size(str(curves))[0] > 500
    assert f"distloop: curves {curves}" in result.stderr
    header = next(iter((tmp_path / "run").glob("**/metrics.csv"))).read_text().splitlines()[0]
    assert "lr-AdamW" in header.split(",")  # the config group's LearningRateMonitor logged the schedule
