"""WandbLogger and MLFlowLogger against the real backends (W&B offline, MLflow on SQLite), read back
from what they wrote: one run per job, continued by a resumed job, written by rank zero only."""

import glob
import importlib.util
import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import wandb
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb.proto import wandb_internal_pb2

from _commands import run
from _spawn import spawn
from distloop import LoopModule, MisconfigurationError, Trainer, loggers
from distloop.loggers import MLFlowLogger, WandbLogger


class Regressor(LoopModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader():
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(logger, root, max_epochs, ckpt_path=None, module=None, **kwargs):
    """4 steps an epoch, each logged; a checkpoint per epoch in ``root/checkpoints``."""
    trainer = Trainer(max_epochs=max_epochs, logger=logger, default_root_dir=str(root), log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kwargs)
    trainer.fit(module or Regressor(), loader(), loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(autouse=True)
def _wandb_quiet_and_local(tmp_path, monkeypatch):
    """Nothing printed, no console capture, nothing written outside ``tmp_path``; every run ended after the test."""
    settings = {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_CODE": "true", "WANDB_DIR": tmp_path,
                "WANDB_CONFIG_DIR": tmp_path / ".wandb-config", "WANDB_CACHE_DIR": tmp_path / ".wandb-cache",
                "WANDB_DATA_DIR": tmp_path / ".wandb-data"}
    for key, value in settings.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    yield
    wandb.finish()


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module's tests (making its tables takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


# ------------------------------------------------------------------ reading W&B's offline files
def _records(path):
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items):
    """``{"a/b": value}`` for a value nested as ``a`` then ``b`` (a logged table's ``samples/_type``)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _finished_records(path, timeout=60.0):
    """The records of a session's file once W&B's service has written its last (``exit``) record.

    ``wandb.finish()`` can return before the service process has flushed the file on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_records(path))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)


def wandb_sessions(root):
    """Each offline session under ``root/wandb``, in the order they started: run id, project, config, history."""
    sessions = []
    for path in glob.glob(f"{root}/wandb/offline-run-*/run-*.wandb"):
        session = {"config": {}, "history": []}
        for record in _finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                session.update(id=record.run.run_id, project=record.run.project,
                               started=record.run.start_time.ToNanoseconds())
                session["config"].update(_items(record.run.config.update))
            elif kind == "config":
                session["config"].update(_items(record.config.update))
            elif kind == "history":
                session["history"].append(_items(record.history.item))
        sessions.append(session)
    return sorted(sessions, key=lambda s: s["started"])


def steps_of(session, key):
    return [row["trainer/global_step"] for row in session["history"] if key in row]


# ------------------------------------------------------------------ W&B
def test_wandb_logs_the_fit_and_a_resumed_fit_continues_its_run(tmp_path):
    first = WandbLogger(save_dir=tmp_path, offline=True, project="distloop-tests")
    module = Regressor()
    first.watch(module, log_freq=2)
    trainer = fit(first, tmp_path, max_epochs=1, module=module)
    run_id = first.version
    assert run_id and first.name == "distloop-tests" and trainer.log_dir == first.save_dir == str(tmp_path)
    first.log_table("samples", columns=["x", "y"], data=[[1, 2]], step=4)
    first.log_image("pictures", [torch.zeros(3, 4, 4)], step=4, caption=["black"])
    wandb.finish()  # the job ends

    second = WandbLogger(save_dir=tmp_path, offline=True, project="distloop-tests")
    assert second.version is None
    resumed = fit(second, tmp_path, max_epochs=2, ckpt_path="last", module=Regressor(lr=0.1))
    assert second.version == run_id
    wandb.finish()

    before, after = wandb_sessions(tmp_path)
    assert (before["id"], after["id"]) == (run_id, run_id)  # one run, written in two sessions
    assert before["project"] == after["project"] == "distloop-tests"
    assert (before["config"]["lr"], after["config"]["lr"]) == (0.05, 0.1)  # a logged value may change
    assert steps_of(before, "train_loss") == [1, 2, 3, 4] and steps_of(after, "train_loss") == [5, 6, 7, 8]
    assert steps_of(before, "val_loss") == [4] and steps_of(after, "val_loss") == [8]
    assert after["history"][-1]["val_loss"] == pytest.approx(float(resumed.callback_metrics["val_loss"]))
    watched = [row["trainer/global_step"] for row in before["history"] if "gradients/layer.weight/_type" in row]
    assert watched == [2, 4]  # log_freq=2
    media = {key: (row[f"{key}/_type"], row["trainer/global_step"])
             for row in before["history"] for key in ("samples", "pictures") if f"{key}/_type" in row}
    assert media == {"samples": ("table-file", 4), "pictures": ("images/separated", 4)}


def test_wandb_keeps_a_given_run_and_refuses_to_switch_a_started_one(tmp_path, caplog):
    given = WandbLogger(save_dir=tmp_path, offline=True, id="mine")
    given.load_state_dict({"id": "saved"})
    assert given.version == "mine" and "not to run 'saved'" in caplog.text

    started = WandbLogger(save_dir=tmp_path, offline=True)
    run_id = started.experiment.id
    with pytest.raises(MisconfigurationError, match=r"before the checkpoint's run 'saved'.*WandbLogger\(id='saved'\)"):
        started.load_state_dict({"id": "saved"})
    assert started.version == run_id

    other = WandbLogger(save_dir=tmp_path, offline=True, id="other")
    with pytest.raises(MisconfigurationError, match=rf"run '{run_id}' is already in progress.*wandb.finish"):
        _ = other.experiment


# ------------------------------------------------------------------ MLflow
def test_mlflow_logs_the_fit_and_a_resumed_fit_continues_its_run(tmp_path, mlflow_uri, caplog):
    first = MLFlowLogger(experiment_name="fit-and-resume", run_name="first", tags={"team": "a"},
                         tracking_uri=mlflow_uri)
    fit(first, tmp_path, max_epochs=1)
    run_id, experiment_id = first.run_id, first.experiment_id
    assert (first.version, first.name) == (run_id, experiment_id)
    assert first.save_dir == os.path.dirname(mlflow_uri[len("sqlite:///"):])
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first" and run.data.tags["team"] == "a"
    assert run.data.params == {"lr": "0.05"}

    second = MLFlowLogger(experiment_name="fit-and-resume", tracking_uri=mlflow_uri)
    resumed = fit(second, tmp_path, max_epochs=2, ckpt_path="last", module=Regressor(lr=0.1))
    assert second.run_id == run_id
    assert [r.info.run_id for r in client.search_runs([experiment_id])] == [run_id]
    assert client.get_experiment(experiment_id).name == "fit-and-resume"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, 9))
    val = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in val] == [4, 8]
    assert val[-1].value == pytest.approx(float(resumed.callback_metrics["val_loss"]))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.05"}  # MLflow cannot change a param
    assert "keeps its first values of ['lr']" in caplog.text


def test_mlflow_keeps_a_given_run_and_refuses_to_switch_a_started_one(mlflow_uri, caplog):
    given = MLFlowLogger(tracking_uri=mlflow_uri, run_id="mine")
    given.load_state_dict({"run_id": "saved"})
    assert "not to run 'saved'" in caplog.text
    with pytest.raises(MisconfigurationError, match="MLflow run 'mine' .* is not in the tracking store"):
        _ = given.version

    started = MLFlowLogger(experiment_name="switch", tracking_uri=mlflow_uri, prefix="p")
    run_id = started.run_id
    with pytest.raises(MisconfigurationError, match=r"before the checkpoint's run 'saved'.*run_id='saved'"):
        started.load_state_dict({"run_id": "saved"})
    assert started.run_id == run_id

    started.log_metrics({"a:b": torch.tensor(2.5), "note": "text"}, step=3)
    [metric] = MlflowClient(mlflow_uri).get_metric_history(run_id, "p-ab")
    assert (metric.step, metric.value) == (3, 2.5)
    assert set(MlflowClient(mlflow_uri).get_run(run_id).data.metrics) == {"p-ab"}


# ------------------------------------------------------------------ two ranks
def _fit_with_both(rank, world_size, root, uri):
    wandb_logger = WandbLogger(save_dir=root, offline=True, project="ddp")
    mlflow_logger = MLFlowLogger(experiment_name="ddp", tracking_uri=uri)
    fit([wandb_logger, mlflow_logger], root, max_epochs=1, strategy="ddp")
    if rank == 0:
        assert wandb_logger.version and mlflow_logger.version
        wandb.finish()
    else:  # the other rank started nothing, and its experiments do nothing
        assert wandb_logger.version is None and mlflow_logger.version is None and wandb.run is None
        assert wandb_logger.experiment.log({"x": 1}) is None


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_two_ranks_make_one_wandb_run_and_one_mlflow_run(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # each rank its own W&B service, not this process's
    spawn(_fit_with_both, 2, str(tmp_path), mlflow_uri, init=False, timeout=120)
    [session] = wandb_sessions(tmp_path)
    assert steps_of(session, "train_loss") == [1, 2]  # 16 samples, 2 ranks, batches of 4
    client = MlflowClient(mlflow_uri)
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train_loss")] == [1, 2]
    [path] = glob.glob(f"{tmp_path}/checkpoints/*.ckpt")
    saved = torch.load(path, weights_only=True)["loggers"]
    assert saved == {"WandbLogger": {"id": session["id"]}, "MLFlowLogger": {"run_id": mlflow_run.info.run_id}}


# ------------------------------------------------------------------ installing and configuring
def test_without_the_trackers_the_loggers_import_and_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    for file, name, extra in (("wandb.py", "WandbLogger", "wandb"), ("mlflow.py", "MLFlowLogger", "mlflow")):
        spec = importlib.util.spec_from_file_location(f"fresh_{extra}", Path(loggers.__file__).with_name(file))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # a module-level import of the tracker would fail here
        with pytest.raises(MisconfigurationError,
                           match=rf"{name} needs the `{extra}` package: `pip install 'distloop\[{extra}\]'"):
            getattr(module, name)()


def test_logging_checkpoints_is_refused_until_supported():
    with pytest.raises(MisconfigurationError, match=r"WandbLogger\(log_model='all'\) is not supported yet"):
        WandbLogger(log_model="all")
    with pytest.raises(MisconfigurationError, match=r"MLFlowLogger\(log_model=True\) is not supported yet"):
        MLFlowLogger(log_model=True)


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_the_command_logs_to_mlflow_and_wandb(tmp_path):
    # Its own W&B service (not this process's, which would write the run's file after the command exits).
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI", "WANDB_SERVICE")}
    env["WANDB_MODE"] = "offline"
    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "distloop", f"hydra.run.dir={run_dir}", "logger=[mlflow,wandb]",
                  "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
                  "test_after_fit=false", "trainer.enable_progress_bar=false"],
                 180, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr

    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")  # the default store, under the run directory
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("lightning_logs").experiment_id])
    assert mlflow_run.data.params["trainer/max_epochs"] == "1" and "val_acc" in mlflow_run.data.metrics
    [session] = wandb_sessions(run_dir)
    assert session["project"] == "distloop" and session["config"]["trainer"]["max_epochs"] == 1
    assert any("val_acc" in row for row in session["history"])
