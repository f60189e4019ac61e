"""Launching ranks: `distloop launcher.*`, an outer torchrun with two nodes, and refusals before start."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _commands import run
from _spawn import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]
TESTS = Path(__file__).parent


def env():
    out = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), out.get("PYTHONPATH")]))
    out["OMP_NUM_THREADS"] = "1"
    return out


def distloop(run_dir: Path, *overrides: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "distloop", f"hydra.run.dir={run_dir}", *overrides], timeout, env=env(),
               cwd=run_dir.parent)


def last_val_acc(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["val_acc"]) for r in csv.DictReader(f) if r.get("val_acc")][-1]


@pytest.mark.timeout(300)
def test_distloop_starts_two_ranks_with_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = distloop(run_dir, "launcher.nproc_per_node=2", "strategy=ddp", "trainer.max_epochs=12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_val_acc(run_dir) >= 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert result.stderr.count("distloop: done:") == 1  # only rank zero reports


@pytest.mark.timeout(300)
def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    start = time.monotonic()
    result = distloop(tmp_path / "run", "launcher.nproc_per_node=2", "strategy=ddp", "strategy.timeout_s=600",
                      "model._target_=failing_modules.FailsOnRankOne", "test_after_fit=false")
    assert result.returncode != 0
    assert time.monotonic() - start < 120  # far less than the collective timeout
    assert "boom on rank 1" in result.stderr
    assert "rank      : 1" in result.stderr or "local_rank: 1" in result.stderr


@pytest.mark.timeout(300)
def test_two_nodes_on_one_machine_share_one_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=twonodes",
           "-m", "distloop", f"hydra.run.dir={run_dir}", "strategy=ddp", "trainer.max_epochs=2",
           "test_after_fit=false"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                              cwd=tmp_path, start_new_session=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:  # on a timeout, take torchrun's workers down too
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (run_dir / "metrics.csv").exists() and (run_dir / "config.yaml").exists()
    assert sum(out.count("distloop: done:") for out in outputs) == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["launcher.nproc_per_node=0"], "launcher.nproc_per_node=0 must be an int >= 1"),
        (["strategy=ddp", "strategy.backend=nccl"], "strategy.backend=nccl needs CUDA"),
        (["strategy=ddp", "strategy.accelerator=cuda"], "needs CUDA, which this machine lacks"),
        (["launcher.nproc_per_node=2", "strategy=single_device"], "use strategy=ddp"),
        (["launcher.nnodes=2"], "needs launcher.rdzv_endpoint"),
        (["strategy.name=deepspeed"], "strategy.name='deepspeed' is not known"),
        (["launcher.nproc_per_node=2", "strategy=ddp", "strategy.devices=4"], "disagrees with launcher"),
    ],
)
def test_bad_launch_configs_are_refused_before_any_process_starts(tmp_path, overrides, message):
    result = distloop(tmp_path / "run", *overrides, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr
    assert "torch.distributed.run" not in result.stderr and "Traceback" not in result.stderr
