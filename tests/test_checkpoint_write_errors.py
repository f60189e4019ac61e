"""A failed checkpoint write is a CheckpointError naming the file and the OS's reason.

On a real, tiny tmpfs (where this process may mount one) and with a simulated full disk:
earlier checkpoints and ``last.ckpt`` stay intact and no temporary file is left behind.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import uuid
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distloop.checkpoint as checkpoint
from distloop import CheckpointError, LoopModule, ModelCheckpoint, Trainer
from distloop.checkpoint import FORMAT, VERSION, BackgroundWriter, load, write_atomic

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


def state(n_floats: int, pieces: int = 1) -> dict[str, Any]:
    """A checkpoint-shaped dict holding about ``4 * n_floats`` bytes of tensors."""
    tensors = {f"w{i}": torch.randn(n_floats // pieces) for i in range(pieces)}
    return {"format": FORMAT, "version": VERSION, "module": tensors}


def leftovers(directory: str) -> list[str]:
    """Temporary files (hidden, ``.tmp``) in ``directory``."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# ------------------------------------------------------------------------------------- tmpfs
@pytest.fixture
def tmpfs(tmp_path) -> Callable[[int], str]:
    """``tmpfs(size_bytes)`` mounts a fresh tmpfs of that size and returns its path (unmounted at the end)."""
    mounted: list[str] = []

    def mount(size: int) -> str:
        if shutil.which("mount") is None or shutil.which("umount") is None:
            pytest.skip("no mount/umount command here, so no small tmpfs to fill")
        path = str(tmp_path / f"disk-{uuid.uuid4().hex[:6]}")
        os.mkdir(path)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", path], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def assert_names_full_disk(err: pytest.ExceptionInfo, path: str) -> None:
    message = str(err.value)
    assert path in message
    assert ENOSPC in message
    assert "Earlier checkpoints are intact" in message
    assert "unexpected pos" not in message and "enforce fail" not in message  # not torch's zip writer's words
    cause = err.value.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC


@pytest.mark.parametrize("pieces", [1, 40], ids=["one-large-tensor", "many-tensors"])
def test_write_atomic_on_a_full_tmpfs(tmpfs, pieces):
    disk = tmpfs(1200 * 1024)
    first = os.path.join(disk, "epoch=0-step=1.ckpt")
    write_atomic(state(1000), first)
    before = open(first, "rb").read()
    second = os.path.join(disk, "epoch=0-step=2.ckpt")

    with pytest.raises(CheckpointError) as err:
        write_atomic(state(400_000, pieces), second)  # 1.6 MB of tensors on a 1.2 MB disk

    assert_names_full_disk(err, second)
    assert open(first, "rb").read() == before
    assert load(first)["module"]["w0"].numel() == 1000
    assert not os.path.exists(second)
    assert leftovers(disk) == []
    write_atomic(state(1000), second)  # the space the failed write took is free again
    assert load(second)["format"] == FORMAT


def test_background_write_on_a_full_tmpfs_raises_once_on_the_training_thread(tmpfs):
    disk = tmpfs(1200 * 1024)
    first = os.path.join(disk, "first.ckpt")
    written: list[str] = []
    writer = BackgroundWriter()
    writer.submit(state(1000), first, written.append)
    writer.wait()
    writer.raise_if_failed()  # nothing failed: returns
    assert written == [first]

    second = os.path.join(disk, "second.ckpt")
    writer.submit(state(400_000), second, written.append)
    writer.join()  # the write is over (it failed): join itself never raises
    with pytest.raises(CheckpointError) as err:
        writer.raise_if_failed()
    assert_names_full_disk(err, second)

    writer.raise_if_failed()  # raised once: a second call does not raise again
    writer.wait()  # nor does wait(): the error was handed over already
    assert written == [first]  # `then` runs only for a complete file
    assert load(first)["module"]["w0"].numel() == 1000
    assert leftovers(disk) == []


# ------------------------------------------------------------------ simulated errors, no tmpfs
class FullDiskFile(io.FileIO):
    """A real file on a disk with ``free`` bytes left: short writes, then ENOSPC, like write(2)."""

    free = 3000

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        if type(self).free <= 0:
            raise OSError(errno.ENOSPC, ENOSPC)
        n = super().write(data[:type(self).free])
        type(self).free -= n
        return n


def test_enospc_from_the_file_write_is_a_checkpoint_error(tmp_path, monkeypatch):
    first = str(tmp_path / "a.ckpt")
    write_atomic(state(1000), first)
    before = open(first, "rb").read()
    opened: list[str] = []

    def open_on_a_full_disk(file: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        assert mode == "xb"
        opened.append(file)
        return io.BufferedWriter(FullDiskFile(file, "x"))

    monkeypatch.setattr(FullDiskFile, "free", 3000)
    monkeypatch.setattr(checkpoint, "open", open_on_a_full_disk, raising=False)
    second = str(tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError) as err:
        write_atomic(state(100_000), second)

    assert_names_full_disk(err, second)
    assert opened and os.path.basename(opened[0]).endswith(".tmp")  # a temporary file was written...
    assert FullDiskFile.free == 0  # ...until the disk was full
    assert leftovers(str(tmp_path)) == []  # ...and removed
    assert not os.path.exists(second)
    assert open(first, "rb").read() == before and load(first)["format"] == FORMAT


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EIO])
def test_an_fsync_error_names_the_file_and_the_reason(tmp_path, monkeypatch, code):
    first = str(tmp_path / "a.ckpt")
    write_atomic(state(1000), first)

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    second = str(tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match=os.strerror(code)) as err:
        write_atomic(state(1000), second)
    assert second in str(err.value)
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == code
    assert leftovers(str(tmp_path)) == [] and not os.path.exists(second)
    assert load(first)["format"] == FORMAT


def test_a_state_torch_cannot_save_leaves_no_temporary_file(tmp_path):
    with pytest.raises(Exception) as err:  # noqa: PT011 - torch/pickle decide the type
        write_atomic({"format": FORMAT, "version": VERSION, "fn": lambda: 0}, str(tmp_path / "a.ckpt"))
    assert not isinstance(err.value, CheckpointError)  # a programming error, not a disk problem
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- a real Trainer run
class Wide(LoopModule):
    """A 64x64 linear layer, so each checkpoint is a few tens of KB."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(64, 64)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run_fit(dirpath: str, root: str, max_epochs: int = 3) -> Trainer:
    g = torch.Generator().manual_seed(3)
    data = DataLoader(TensorDataset(torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)),
                      batch_size=8)
    trainer = Trainer(max_epochs=max_epochs,
                      callbacks=[ModelCheckpoint(dirpath=dirpath, every_n_train_steps=2, save_top_k=-1,
                                                 save_last=True)],
                      logger=False, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(Wide(), data)
    return trainer


def checkpoint_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.endswith(".ckpt") and not n.startswith(".") and n != "last.ckpt")


@pytest.mark.e2e
def test_a_fit_that_fills_the_disk_stops_with_a_checkpoint_error(tmp_path, tmpfs):
    measure = str(tmp_path / "measure")
    run_fit(measure, str(tmp_path / "root-measure"), max_epochs=1)
    sizes = [os.path.getsize(p) for p in checkpoint_files(measure)]
    assert len(sizes) == 4 and min(sizes) > 16 * 1024  # 8 steps, one every 2; the weights alone are 16 KB
    page = 4096
    per_file = -(-max(sizes) // page) * page  # tmpfs counts whole pages
    disk = tmpfs(3 * per_file + per_file // 2)  # three checkpoints fit, the fourth does not

    with pytest.raises(CheckpointError) as err:
        run_fit(disk, str(tmp_path / "root"))

    message = str(err.value)
    assert ENOSPC in message and "unexpected pos" not in message
    failed = message.split("Could not write checkpoint ", 1)[1].split(": ", 1)[0]
    assert os.path.dirname(failed) == disk and failed.endswith(".ckpt")
    assert not os.path.exists(failed)
    assert leftovers(disk) == []
    survivors = checkpoint_files(disk)
    assert len(survivors) >= 2
    steps = [load(p)["global_step"] for p in survivors]  # every file written before the failure loads
    last = os.path.join(disk, "last.ckpt")
    assert os.path.islink(last)
    resolved = os.path.realpath(last)
    assert resolved in survivors
    assert load(last)["global_step"] == max(steps)  # last.ckpt is the newest complete checkpoint
    assert os.path.basename(failed) not in {os.path.basename(p) for p in survivors}
