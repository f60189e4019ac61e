"""Checkpoint files: the format, atomic writes (in the background), loading, finding the newest valid one.

A checkpoint is a dict of plain data and tensors, loadable with
``torch.load(weights_only=True)``: opening one never runs code. It is written to a
temporary file in the same directory, flushed, fsynced and renamed into place, so a
crash or a full disk during a write leaves every earlier checkpoint intact.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
from typing import Any, Callable

import torch

FORMAT = "distloop-checkpoint"
VERSION = 2  # 2: Lightning's names for the module and optimizer parts (see state.py)
SUFFIX = ".ckpt"
LAST = "last" + SUFFIX


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


def write_atomic(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` so that ``path`` is either the old file or the complete new one.

    A failed write (a full disk, a quota, an I/O error) raises ``CheckpointError`` naming
    ``path`` and the OS's reason, and leaves no temporary file behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A hidden name in the same directory (so the rename is atomic), created like any file (umask).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    sink: _RecordingWriter | None = None
    stage = "writing"
    try:
        with open(tmp, "xb") as f:
            sink = _RecordingWriter(f)
            torch.save(state, sink)
            sink.flush()
            if sink.error is not None:  # torch's zip writer swallowed it and carried on
                raise sink.error
            stage = "syncing"
            os.fsync(f.fileno())
        stage = "renaming into place"
        os.replace(tmp, path)
        stage = "syncing the directory"
        _fsync_dir(directory)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:  # never created, or already renamed; do not hide the error that matters
            pass
        # torch's zip writer turns the OSError of a failed write into a RuntimeError that
        # does not say why ("unexpected pos ..."): the sink kept the original.
        os_error = sink.error if sink is not None and sink.error is not None else err
        if isinstance(err, Exception) and isinstance(os_error, OSError):
            reason = os.strerror(os_error.errno) if os_error.errno else str(os_error)
            raise CheckpointError(f"Could not write checkpoint {path}: {reason} (while {stage}). "
                                  "Earlier checkpoints are intact.") from os_error
        raise


class _RecordingWriter:
    """The file object ``torch.save`` writes through: it keeps the first ``OSError`` of a write.

    Writes are passed straight through (no copy); everything else is the wrapped file's.
    """

    def __init__(self, file: Any) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            if self.error is None:
                self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def point_last(directory: str, target: str) -> None:
    """Make ``directory/last.ckpt`` point at ``target``, atomically (a relative symlink)."""
    link = os.path.join(directory, LAST)
    tmp = os.path.join(directory, f".{LAST}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.relpath(target, directory), tmp)
    os.replace(tmp, link)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, or raise ``CheckpointError`` saying what is wrong with it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint file at {path}.")
    try:
        # mmap: tensors are read from the file as they are used, not all at once on every rank.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means the same to the user
        raise CheckpointError(
            f"{path} is not a readable distloop checkpoint (truncated, corrupt, or another kind of file): "
            f"{type(err).__name__}: {str(err)[:300]}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distloop checkpoint (no '{FORMAT}' marker).")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {state['version']}; this distloop reads up to "
                              f"{VERSION}. Upgrade distloop.")
    return upgrade(state)


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an older format version, in today's layout (before any hook sees it)."""
    if state.get("version", 0) < 2:  # version 1 named the module and optimizer parts in distloop's own words
        state = dict(state)
        if "module" in state:
            state["state_dict"] = state.pop("module")
        if "optimizer" in state:
            optimizer = state.pop("optimizer")
            state["optimizer_states"] = [] if optimizer is None else [optimizer]
        state["version"] = VERSION
    return state


def newest_valid(directories: list[str]) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint that loads, its state, and a note for each newer one that did not."""
    candidates = []
    for directory in dict.fromkeys(directories):
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.endswith(SUFFIX) and not name.startswith(".") and not os.path.islink(path):
                candidates.append((os.path.getmtime(path), path))
    skipped = []
    for _, path in sorted(candidates, reverse=True):
        try:
            return path, load(path), skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, None, skipped


class BackgroundWriter:
    """Writes snapshots on one background thread, so training waits only for the snapshot.

    The error of a failed write is kept until the training thread takes it (``take_error``,
    cheap, for every step boundary) or ``wait`` / ``raise_if_failed`` raise it; ``submit``
    waits for the previous write without raising, so the error is reported in one place.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], path: str, then: Callable[[str], None] | None = None) -> None:
        self.join()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="distloop-checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put((state, path, then))

    def join(self) -> None:
        """Block until every submitted write is done, failed ones included."""
        self._jobs.join()

    def close(self) -> None:
        """Finish the writes, then stop the thread (at the end of a run: no thread outlives it)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._thread = None

    def wait(self) -> None:
        """Block until every submitted write is on disk; re-raise a failed write's error."""
        self.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Re-raise, once, the error of a background write that has failed; never waits.

        A write still in progress is not waited for: if it fails, a later call raises.
        """
        error = self.take_error()
        if error is not None:
            raise error

    def take_error(self) -> BaseException | None:
        """The error of a failed background write, once (then ``None`` again); never waits."""
        error = self._error
        if error is not None:
            # Only the calling (training) thread clears the error, and the worker sets it only
            # while a job is in flight, which is never while an unraised error is pending.
            self._error = None
        return error

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:  # close()
                self._jobs.task_done()
                return
            state, path, then = job
            try:
                write_atomic(state, path)
                if then is not None:
                    then(path)
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                self._error = err
            finally:
                state = then = None  # do not hold a checkpoint's worth of memory until the next save
                self._jobs.task_done()


def snapshot(obj: Any, _copies: dict | None = None) -> Any:
    """A copy of ``obj`` whose tensors live on the CPU and are not shared with training.

    Tensors that share memory (tied weights, views) still share it in the copy, so the
    file is the same as a direct ``torch.save`` would write.
    """
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr(), storage.nbytes())
        if key not in copies:
            copies[key] = storage.cpu().clone() if tensor.device.type == "cpu" else storage.cpu()
        return torch.empty(0, dtype=tensor.dtype).set_(copies[key], tensor.storage_offset(), tensor.size(),
                                                       tensor.stride())
    if isinstance(obj, dict):
        return {k: snapshot(v, copies) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(snapshot(v, copies) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v, copies) for v in obj)
    return obj
