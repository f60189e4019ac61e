"""Checkpoint files and directories: the format, atomic writes (in the background), loading,
finding the newest valid one, consolidating a sharded one.

A checkpoint is a dict of plain data and tensors, loadable with
``torch.load(weights_only=True)``: opening one never runs code. It is written to a
temporary file in the same directory, flushed, fsynced and renamed into place, so a
crash or a full disk during a write leaves every earlier checkpoint intact.

A sharded checkpoint (FSDP) is a directory: every rank writes its shards of the sharded
tensors (DTensors) with ``torch.distributed.checkpoint``, and global rank zero writes the
rest of the dict to ``run.pt``, each sharded tensor replaced by a ``meta`` tensor of its
global shape. The directory is built under a hidden name and renamed into place once
``run.pt`` is in it, so it too is either complete or absent. Only tensors go to DCP (it
unpickles anything else with ``weights_only=False``), so reading one never runs code either.
It loads on any number of processes, or none: ``load`` reads the full tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import secrets
import shutil
import threading
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

FORMAT = "distloop-checkpoint"
VERSION = 2  # 2: Lightning's names for the module and optimizer parts (see state.py)
SUFFIX = ".ckpt"
LAST = "last" + SUFFIX
HEADER = ("format", "version", "global_step", "epoch", "world_size")
# What a weights-only checkpoint keeps (``ModelCheckpoint(save_weights_only=True)``), besides the header.
WEIGHTS_ONLY_PARTS = ("state_dict", "hyper_parameters", "hparams_name", "datamodule_hyper_parameters",
                      "datamodule_hparams_name")
RUN_FILE = "run.pt"
_PARTIAL, _OLD = ".partial", ".old"  # hidden sharded directories: being written; replaced, being removed  # in a sharded checkpoint directory: everything but the shards, written last


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
        replace(tmp, path)
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
    replace(tmp, link)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint (a file, or a sharded directory) onto the CPU, or raise
    ``CheckpointError`` saying what is wrong with it."""
    if os.path.isdir(path):
        state = _read_run_file(path)
        _fill_sharded(state, path)
        return upgrade(state)
    if not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint at {path}.")
    return upgrade(_read(path, path))


def _read(file: str, path: str) -> dict[str, Any]:
    """``file``'s checkpoint dict, header checked; errors name ``path`` (the checkpoint)."""
    try:
        # mmap: tensors are read from the file as they are used, not all at once on every rank.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means the same to the user
        raise CheckpointError(
            f"{path} is not a readable distloop checkpoint (truncated, corrupt, or another kind of file): "
            f"{type(err).__name__}: {str(err)[:300]}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distloop checkpoint (no '{FORMAT}' marker).")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {state['version']}; this distloop reads up to "
                              f"{VERSION}. Upgrade distloop.")
    return state


def _read_run_file(path: str) -> dict[str, Any]:
    run_file = os.path.join(path, RUN_FILE)
    if not os.path.isfile(run_file):
        raise CheckpointError(f"{path} is not a complete sharded checkpoint: it has no {RUN_FILE}.")
    return _read(run_file, path)


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


def newest_valid(directories: list[str]) -> tuple[str | None, list[str]]:
    """The newest valid checkpoint, and a note for each newer one that is not (a sharded one's
    shards are checked against its ``run.pt``, not read)."""
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
            check_sharded(path) if os.path.isdir(path) else load(path)
            return path, skipped
        except CheckpointError as err:
            skipped.append(str(err))
    return None, skipped


class BackgroundWriter:
    """Writes snapshots on one background thread, so training waits only for the snapshot
    (``submit`` a file, ``run`` any write job: a sharded save's).

    The error of a failed write is kept until the training thread takes it (``take_error``,
    cheap, for every step boundary) or ``wait`` / ``raise_if_failed`` raise it; ``submit``
    waits for the previous write without raising, so the error is reported in one place.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=1)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, state: dict[str, Any], path: str, then: Callable[[str], None] | None = None) -> None:
        """Write ``state`` to ``path``, then call ``then(path)``."""
        self.run(functools.partial(_write_then, state, path, then))

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the writer thread, after the previous one."""
        self.join()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="distloop-checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

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
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - handed to the training thread
                self._error = err
            finally:
                job = None  # do not hold a checkpoint's worth of memory until the next save
                self._jobs.task_done()


def _write_then(state: dict[str, Any], path: str, then: Callable[[str], None] | None) -> None:
    write_atomic(state, path)
    if then is not None:
        then(path)


def snapshot(obj: Any, _copies: dict | None = None) -> Any:
    """A copy of ``obj`` whose tensors live on the CPU and are not shared with training.

    Tensors that share memory (tied weights, views) still share it in the copy, so the
    file is the same as a direct ``torch.save`` would write.
    """
    copies = {} if _copies is None else _copies
    if isinstance(obj, torch.Tensor) and obj.is_meta:  # a sharded checkpoint's placeholder: no data
        return obj
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


# --------------------------------------------------------------- sharded checkpoint directories
@dataclasses.dataclass
class ShardedSave:
    """One rank's part of a sharded checkpoint: its shards, and (on global rank zero) the rest."""

    shards: dict[str, DTensor | StagedShard]  # by their place in the checkpoint, e.g. "state_dict/0.weight"
    skeleton: dict[str, Any] | None  # the checkpoint, each shard a meta tensor; None off rank zero


@dataclasses.dataclass
class StagedShard:
    """A copy of a DTensor's local shard and its layout, made a DTensor again on the writer thread."""

    local: torch.Tensor
    placements: tuple
    shape: torch.Size
    stride: tuple

    def on(self, mesh: Any) -> DTensor:
        return DTensor.from_local(self.local, mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)


def split_sharded(checkpoint: dict[str, Any], keep_skeleton: bool) -> ShardedSave:
    """``checkpoint``'s DTensors by key, and (if ``keep_skeleton``) the checkpoint without them."""
    shards: dict[str, DTensor | StagedShard] = {}

    def cut(obj: Any, where: tuple) -> Any:
        if isinstance(obj, DTensor):
            key = _key(where)
            if key in shards:
                raise CheckpointError(f"Two sharded tensors of the checkpoint are both named {key!r}.")
            shards[key] = obj
            return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
        return _map_children(obj, where, cut)

    skeleton = cut(checkpoint, ())
    return ShardedSave(shards, skeleton if keep_skeleton else None)


def stage_sharded(save: ShardedSave) -> ShardedSave:
    """A copy of ``save`` that training cannot change: each rank's local shards copied to the CPU
    (only the copy happens here; ``write_sharded`` lays them out again)."""
    shards: dict[str, DTensor | StagedShard] = {
        key: StagedShard(snapshot(d.to_local()), d.placements, d.shape, d.stride())
        for key, d in save.shards.items() if isinstance(d, DTensor)}
    return ShardedSave(shards, None if save.skeleton is None else snapshot(save.skeleton))


def write_sharded(save: ShardedSave, path: str, group: Any, then: Callable[[str], None] | None = None,
                  cpu_mesh: Any = None) -> None:
    """Write the directory ``path``: a collective over ``group`` (every rank writes its shards;
    staged ones are laid out over ``cpu_mesh``, the ranks of ``group`` on the CPU).

    It is built as a hidden sibling and renamed into place by global rank zero after its
    ``run.pt``, then ``then(path)`` runs there; a crash before leaves ``path`` as it was.
    """
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f".{name}{_PARTIAL}")
    zero = save.skeleton is not None
    failure: OSError | None = None
    if zero:
        try:
            os.makedirs(directory, exist_ok=True)
            _remove_leftovers(directory)  # of saves that crashed
            os.makedirs(partial)
        except OSError as err:
            failure = err
    # Every rank runs the same collectives whatever failed, so that the next save pairs with the
    # next save: the directory exists, empty, before any rank writes into it, or all give up.
    ready = torch.tensor([0 if failure else 1])
    dist.all_reduce(ready, op=dist.ReduceOp.MIN, group=group)
    if not ready.item():
        reason = f"{os.strerror(failure.errno) if failure.errno else failure}" if failure else "see rank zero's error"
        raise CheckpointError(f"Could not write sharded checkpoint {path}: {reason} (while making {partial}). "
                              "Earlier checkpoints are intact.") from failure
    shards = {key: shard.on(cpu_mesh) if isinstance(shard, StagedShard) else shard
              for key, shard in save.shards.items()}
    try:
        dcp.save(shards, storage_writer=dcp.FileSystemWriter(partial), process_group=group)
    except (Exception, CheckpointException) as err:  # DCP raises on every rank when one fails
        raise CheckpointError(f"Could not write sharded checkpoint {path}: {_dcp_reason(err)}. Earlier "
                              "checkpoints are intact.") from err
    if not zero:
        return
    assert save.skeleton is not None
    write_atomic(save.skeleton, os.path.join(partial, RUN_FILE))
    replace(partial, path)
    _fsync_dir(directory)
    if then is not None:
        then(path)


def replace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, whatever ``dst`` is: atomically (``os.replace``) unless one of
    them is a directory (a sharded checkpoint), when ``dst`` is renamed aside first and removed."""
    if not (os.path.lexists(dst) and (_is_dir(dst) or _is_dir(src))):
        os.replace(src, dst)
        return
    aside = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{secrets.token_hex(6)}{_OLD}")
    os.rename(dst, aside)
    os.rename(src, dst)
    remove(aside)


def _is_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _remove_leftovers(directory: str) -> None:
    """The hidden directories of saves that crashed, and of replaced checkpoints not yet removed."""
    for name in os.listdir(directory):
        if name.startswith(".") and (name.endswith(_PARTIAL) or name.endswith(_OLD)):
            remove(os.path.join(directory, name))


def remove(path: str) -> None:
    """Delete a checkpoint: a file, a link, or a sharded directory."""
    if _is_dir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _fill_sharded(state: dict[str, Any], path: str) -> None:
    """Replace ``run.pt``'s placeholders with the full tensors from the shards (no collective)."""
    placeholders = dict(_placeholders(state))
    if not placeholders:
        return
    full = {key: torch.empty(t.shape, dtype=t.dtype) for key, t in placeholders.items()}
    try:
        with warnings.catch_warnings():  # that no process group takes part is what no_dist says
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(full, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    except (Exception, CheckpointException) as err:  # missing or damaged shards mean the same to the user
        raise CheckpointError(f"The shards of {path} do not load: {_dcp_reason(err)}") from err

    def fill(obj: Any, where: tuple) -> Any:
        if isinstance(obj, torch.Tensor) and obj.is_meta:
            return full[_key(where)]
        return _map_children(obj, where, fill)

    for name in list(state):
        state[name] = fill(state[name], (name,))


def _dcp_reason(err: BaseException) -> str:
    """What went wrong, without the tracebacks DCP puts into its errors' messages."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))
        if isinstance(err, tuple):  # (exception, traceback summary) in some torch versions
            err = err[0]
    return f"{type(err).__name__}: {str(err)[:300]}"


def check_sharded(path: str) -> dict[str, Any]:
    """``run.pt``'s dict if the shards hold every tensor it names, with its shape; reads no shard."""
    state = _read_run_file(path)
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"{path} has no readable shard metadata: {type(err).__name__}: {err}") from err
    for key, tensor in _placeholders(state):
        saved = metadata.state_dict_metadata.get(key)
        if (not isinstance(saved, TensorStorageMetadata) or tuple(saved.size) != tuple(tensor.shape)
                or saved.properties.dtype != tensor.dtype):
            raise CheckpointError(f"{path}: the shards lack {key!r} ({tensor.dtype} of shape {tuple(tensor.shape)}).")
    for info in (metadata.storage_data or {}).values():  # every rank's file, complete
        file = os.path.join(path, info.relative_path)
        if not os.path.isfile(file) or os.path.getsize(file) < info.offset + info.length:
            raise CheckpointError(f"{path}: shard file {info.relative_path} is missing or truncated.")
    return state


def consolidate(src: str, dst: str, optimizer: bool = False) -> None:
    """Write the checkpoint ``src`` (a sharded directory, or a file) as one file at ``dst``: the
    full module state dict (``state_dict``) and hyperparameters, and the optimizer states if
    ``optimizer``; for inference, export and sharing (``torch.load(dst, weights_only=True)``)."""
    state = load(src)
    if optimizer and not state.get("optimizer_states"):
        raise CheckpointError(f"{src} holds no optimizer state (saved with save_weights_only=True, or outside fit): "
                              "consolidate it without the optimizer.")
    keep = HEADER + WEIGHTS_ONLY_PARTS + (("optimizer_states",) if optimizer else ())
    write_atomic({k: state[k] for k in keep if k in state}, dst)


def _placeholders(obj: Any, where: tuple = ()) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_meta:
            yield _key(where), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _placeholders(v, (*where, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _placeholders(v, (*where, i))


def _key(where: tuple) -> str:
    return "/".join(str(part) for part in where)


def _map_children(obj: Any, where: tuple, fn: Callable[[Any, tuple], Any]) -> Any:
    """``obj`` with ``fn(child, place)`` applied to each child of a dict, list or tuple."""
    if isinstance(obj, dict):
        return {k: fn(v, (*where, k)) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(fn(v, (*where, i)) for i, v in enumerate(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(fn(v, (*where, i)) for i, v in enumerate(obj))
    return obj
