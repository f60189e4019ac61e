"""ResultCollection: what ``self.log`` accumulates, and its sync across ranks.

One ``_Result`` per logged key (``"<hook>.<name>"``): the step value, an epoch accumulator
on the value's device that starts at the reduction's identity, the values waiting to be
folded in ``FOLD_EVERY`` at a time, and for a mean its batch-size weight, a host float.
Invariants: logging neither communicates nor syncs host and device; reading never folds,
so totals depend only on the values logged; waiting values go into checkpoints.
``sync_dist`` values cross ranks only at sync points every rank reaches alike (a step
read, an epoch read, ``sync`` for a checkpoint), one buffer per (reduce op, dtype), with
a key check; ``_agreed`` changes only there, identically on every rank, so buffers are
always sized alike and a mismatch is an error, never a hang. ``sync_dist=False`` values
stay rank-local; without ``sync_fn`` a collection never communicates.

Protocol (buffer layout, header and flags, costs, checkpoints): ``docs/metric-sync.md``.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from distloop.errors import MisconfigurationError

if TYPE_CHECKING:
    from torchmetrics import Metric


def is_metric(value: Any) -> bool:
    """Whether ``value`` is a torchmetrics ``Metric``, without importing torchmetrics (seconds, with
    SciPy): a user who made one has imported it."""
    torchmetrics = sys.modules.get("torchmetrics")
    return torchmetrics is not None and isinstance(value, torchmetrics.Metric)

SyncFn = Callable[[Tensor, str], Tensor]

_REDUCE_FX: dict[Any, str] = {
    "mean": "mean",
    "avg": "mean",
    "sum": "sum",
    "max": "max",
    "min": "min",
    torch.mean: "mean",
    torch.sum: "sum",
    torch.max: "max",
    torch.min: "min",
}
_WIRE_OP = {"mean": "sum", "weight": "sum"}  # how a request's op travels: means and their weights as sums
_IDENTITY = {"mean": 0.0, "sum": 0.0, "max": -math.inf, "min": math.inf}
_STATE_FORMAT = 1
FLAG_BITS = 8  # the flags a sync point agrees on: bits 0 to 7, each OR-ed over ranks
FOLD_EVERY = 64  # waiting epoch values folded together
_SMALL_BASE = 64  # a view of a tensor of at most this many elements may wait: keeping it alive costs nothing
_LAST = "#last"  # suffix of a synced step value's key in an epoch read


@dataclass(frozen=True)
class _Meta:
    fx: str
    name: str
    on_step: bool
    on_epoch: bool
    reduce_fx: str
    sync_dist: bool
    prog_bar: bool
    logger: bool
    metric_attribute: str | None

    @property
    def forked(self) -> bool:
        """Both step and epoch values are reported, as ``name_step`` and ``name_epoch``."""
        return self.on_step and self.on_epoch


@dataclass
class MetricsRead:
    """What one read of a collection gives each consumer, and the flags the ranks agreed on."""

    log: dict[str, Tensor]  # for the loggers (forked names: ``x_step`` / ``x_epoch``)
    pbar: dict[str, Tensor]  # for the progress bar
    callback: dict[str, Tensor]  # for ``trainer.callback_metrics`` (plain and forked names)
    flags: int  # the OR over ranks of every rank's ``flags`` argument


class _Result:
    """One logged name: its step value, epoch accumulator (and the values waiting to be folded in), or Metric."""

    __slots__ = ("meta", "op", "args", "last", "value", "weight", "metric", "pending", "sizes")

    def __init__(self, meta: _Meta, args: tuple) -> None:
        self.meta = meta
        self.op = meta.reduce_fx
        self.args = args
        self.last: Tensor | None = None
        self.value: Tensor | None = None
        self.weight: float | Tensor = 0.0
        self.metric: Metric | None = None
        self.pending: list[Tensor] = []  # values logged but not yet folded into ``value``
        self.sizes: list[int] = []  # their batch sizes

    def accumulate(self, v: Tensor, batch_size: int | float | Tensor) -> None:
        """Fold ``v`` in now (the first value of an epoch creates the accumulator)."""
        if self.value is None:
            dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
            self.value = v.to(dtype) * batch_size if self.op == "mean" else v.to(dtype, copy=True)
            self.weight = batch_size if isinstance(batch_size, Tensor) else float(batch_size)
            return
        op, acc = self.op, self.value
        if op == "mean":
            if isinstance(batch_size, Tensor):
                acc.add_(v * batch_size)
            else:
                acc.add_(v, alpha=batch_size)
            self.weight = self.weight + batch_size
        elif op == "sum":
            acc.add_(v)
        elif op == "max":
            torch.maximum(acc, v, out=acc)
        else:
            torch.minimum(acc, v, out=acc)

    def fold(self) -> None:
        """Fold the waiting values into the accumulator: a few kernels for ``FOLD_EVERY`` values."""
        self.value, self.weight = self.total()
        self.pending.clear()
        self.sizes.clear()

    def total(self) -> tuple[Tensor, float | Tensor]:
        """The accumulator with the waiting values folded in, and its weight: new objects, nothing changed."""
        if not self.pending:
            return self.value, self.weight
        total, weight = self._pending_total()
        if self.op == "max":
            return torch.maximum(self.value, total), self.weight
        if self.op == "min":
            return torch.minimum(self.value, total), self.weight
        return self.value + total, self.weight + weight

    def _pending_total(self) -> tuple[Tensor, float]:
        """The waiting values reduced (weighted by batch size for a mean), and their total weight."""
        pending = self.pending
        changed = next((i for i, v in enumerate(pending) if v._version), None)
        if changed is not None:
            raise MisconfigurationError(
                f"`{self.meta.name}` was changed in place after `self.log` (the value logged "
                f"{len(pending) - changed} calls ago); log it after its last change, or log a copy "
                "(`value.clone()`)."
            )
        stacked = torch.stack(pending)
        if self.op == "max":
            return stacked.amax(), 0.0
        if self.op == "min":
            return stacked.amin(), 0.0
        if self.op == "sum":
            return stacked.sum(), 0.0
        sizes = self.sizes
        if sizes.count(sizes[0]) == len(sizes):  # one batch size: no weights to send to the device
            return stacked.sum() * sizes[0], float(sizes[0] * len(sizes))
        weights = torch.tensor(sizes, dtype=stacked.dtype).to(stacked.device, non_blocking=True)
        return (stacked * weights).sum(), float(sum(sizes))

    def epoch_value(self) -> Tensor | None:
        """This rank's epoch value: a new tensor, never the live accumulator that later steps change."""
        if self.value is None:
            return None
        value, weight = self.total()
        if self.op == "mean":
            return value / weight
        return value.clone() if value is self.value else value

    def reset(self) -> None:
        self.last = None
        self.pending.clear()
        self.sizes.clear()
        if self.value is not None:
            self.value.fill_(_IDENTITY[self.op])
            self.weight = 0.0


class ResultCollection:
    """What one loop kind (train / validation / test) has logged.

    ``sync_fn(tensor, reduce_op)`` reduces a tensor across ranks (the Strategy's
    ``reduce``); without one the collection is single-process and never communicates.
    """

    def __init__(self, training: bool = False, device: torch.device | str | None = None) -> None:
        self.training = training
        self.device = torch.device(device) if device is not None else None
        self.sync_fn: SyncFn | None = None
        self._items: dict[str, _Result] = {}
        self._synced = False
        self._unsynced_state: dict[str, tuple[Tensor | None, float | Tensor, list[Tensor], list[int]]] = {}
        self._layout_cache: tuple[tuple, int] | None = None
        # Sync point kind -> the layout every rank held at its last one. It changes only at
        # sync points, alike on every rank, so every rank can size buffers from it.
        self._agreed: dict[str, tuple] = {}
        self._epoch_read = False  # since the last clear: step values then go by their epoch names

    # ------------------------------------------------------------------ logging
    def log(
        self,
        fx: str,
        name: str,
        value: Any,
        *,
        on_step: bool = False,
        on_epoch: bool = True,
        reduce_fx: str | Callable = "mean",
        sync_dist: bool = False,
        prog_bar: bool = False,
        logger: bool = True,
        batch_size: int | Tensor | None = None,
        metric_attribute: str | None = None,
    ) -> None:
        """Record ``value`` under ``name`` as logged from hook ``fx``.

        The full path (first values of an epoch, numbers, Metrics, values that may change):
        at most one small kernel, and never a move to the host. ``try_log`` is the usual one.
        """
        key = fx + "." + name
        args = (on_step, on_epoch, reduce_fx, sync_dist, prog_bar, logger, metric_attribute)
        result = self._items.get(key)
        if result is None:
            result = self._new_result(key, fx, name, value, args)
        elif result.args != args:
            meta = self._make_meta(fx, name, value, args)
            if meta != result.meta:
                raise MisconfigurationError(
                    f"`self.log({name!r}, ...)` was called twice in `{fx}` with different "
                    f"arguments ({_describe(result.meta)} then {_describe(meta)}); log it with "
                    "the same arguments each time, or under another name."
                )
            result.args = args
        if isinstance(value, Tensor) and result.metric is None:  # the common case first: it is the hot path
            v = value.detach() if value.requires_grad else value
            if v.ndim:
                if v.numel() != 1:
                    raise MisconfigurationError(
                        f"`self.log({name!r}, value)` needs a scalar; got a tensor of shape "
                        f"{tuple(v.shape)}. Reduce it first, e.g. `value.mean()`."
                    )
                v = v.reshape(())
            if not v.is_floating_point():
                v = v.to(torch.get_default_dtype())
        elif result.metric is not None or is_metric(value):
            if not is_metric(value):
                raise MisconfigurationError(
                    f"`{name}` was logged as a torchmetrics Metric in `{fx}` and then as "
                    f"{type(value).__name__}; log one kind of value per name."
                )
            result.metric = value
            return
        elif isinstance(value, (int, float)):
            v = torch.tensor(float(value), device=self.device)
        else:
            raise MisconfigurationError(
                f"`self.log({name!r}, value)` takes a number, a scalar tensor or a torchmetrics "
                f"Metric; got {type(value).__name__}."
            )
        result.last = v
        if on_epoch:
            result.accumulate(v, 1 if batch_size is None else batch_size)

    def try_log(self, key: str, args: tuple, value: Tensor, batch_size: int) -> bool:
        """``log`` for a scalar float tensor under arguments this key was logged with before.

        The hot path of ``self.log``: one dict lookup and, for a freshly computed value,
        no kernel (it waits to be folded in with others). ``False`` means "not that
        case": call ``log``.
        """
        result = self._items.get(key)
        if result is None or result.args != args or result.metric is not None:
            return False
        if value.requires_grad:
            if value.is_leaf:
                return False  # a parameter: ``log`` folds it in before the optimizer changes it
            value = value.detach()
        acc = result.value
        if acc is None:
            if args[1] or value.ndim or not value.is_floating_point():
                return False  # on_epoch: the first value of an epoch takes the full path
            result.last = value
            return True
        if value.ndim or value.dtype is not acc.dtype:
            return False
        base = value._base
        try:
            changed = value._version
        except RuntimeError:  # an inference tensor (evaluation under inference_mode) has no version: fold it now
            changed = 1
        if changed or value is result.last or (base is not None and base.numel() > _SMALL_BASE):
            result.accumulate(value, batch_size)  # it may change later, or would keep a large tensor alive
        else:
            pending = result.pending
            pending.append(value)
            result.sizes.append(batch_size)
            if len(pending) == FOLD_EVERY:
                result.fold()
        result.last = value
        return True

    def _new_result(self, key: str, fx: str, name: str, value: Any, args: tuple) -> _Result:
        result = _Result(self._make_meta(fx, name, value, args), args)
        self._items[key] = result
        self._layout_cache = None
        return result

    @staticmethod
    def _make_meta(fx: str, name: str, value: Any, args: tuple) -> _Meta:
        on_step, on_epoch, reduce_fx, sync_dist, prog_bar, logger, metric_attribute = args
        if not isinstance(name, str) or not name:
            raise MisconfigurationError(f"A logged name must be a non-empty string, got {name!r}.")
        if not (on_step or on_epoch):
            raise MisconfigurationError(
                f"`self.log({name!r}, ..., on_step=False, on_epoch=False)` would log nothing: "
                "set `on_step=True` or `on_epoch=True`."
            )
        op = _REDUCE_FX.get(reduce_fx) if not isinstance(reduce_fx, str) else _REDUCE_FX.get(reduce_fx.lower())
        if op is None:
            raise MisconfigurationError(
                f"`reduce_fx={reduce_fx!r}` for `{name}` is not supported: use 'mean', 'sum', "
                "'max' or 'min' (or torch.mean / torch.sum / torch.max / torch.min)."
            )
        if is_metric(value) and metric_attribute is None:
            raise MisconfigurationError(
                f"`{name}` is a torchmetrics Metric: pass `metric_attribute`, the name under "
                "which the module holds it, so its state can be restored from a checkpoint."
            )
        return _Meta(fx, name, bool(on_step), bool(on_epoch), op, bool(sync_dist),
                     bool(prog_bar), bool(logger), metric_attribute)

    # ------------------------------------------------------------------ reading
    def step_values(self) -> dict[str, Tensor]:
        """The latest rank-local step values (not ``sync_dist``), under ``callback_metrics`` names:
        no collective and no host sync, so a monitor may read them after any batch. Empty once the
        epoch's values were read (they then take the plain names)."""
        if self._epoch_read:
            return {}
        out: dict[str, Tensor] = {}
        for r in self._items.values():
            meta = r.meta
            if not meta.on_step or meta.sync_dist:
                continue
            value = r.last
            if r.metric is not None:
                cache = r.metric._forward_cache
                value = cache if isinstance(cache, Tensor) else None
            if value is None:
                continue
            out[meta.name] = value
            if meta.forked:
                out[meta.name + "_step"] = value
        return out

    def local_epoch_values(self) -> dict[str, Tensor]:
        """This rank's epoch values so far, under ``callback_metrics`` names, with no collective:
        what callbacks see at an epoch end before the synced read (torchmetrics Metrics left out:
        computing one syncs it)."""
        out: dict[str, Tensor] = {}
        for r in self._items.values():
            meta = r.meta
            if not meta.on_epoch or r.metric is not None:
                continue
            value = r.epoch_value()
            if value is not None:
                out[meta.name] = value
                if meta.forked:
                    out[meta.name + "_epoch"] = value
        return out

    def is_synced_step_value(self, name: str) -> bool:
        """Whether ``name`` (plain or ``_step``) is a ``sync_dist`` step value of this collection."""
        for r in self._items.values():
            meta = r.meta
            if meta.on_step and meta.sync_dist and name in (meta.name, meta.name + "_step"):
                return True
        return False

    def metrics(self, on_step: bool, flags: int = 0) -> MetricsRead:
        """The step (``on_step=True``) or epoch values, split by consumer.

        ``sync_dist`` values are reduced across ranks here, all together: every rank must
        call this at the same point. ``flags`` (bits below ``2**FLAG_BITS``: the control
        plane's requests) ride along in the same collective; the read returns their OR over
        ranks.
        """
        requests: list[tuple[str, str, Tensor | float, torch.dtype]] = []
        read: list[tuple[_Result, str]] = []
        for key, r in self._items.items():
            if not (r.meta.on_step if on_step else r.meta.on_epoch):
                continue
            read.append((r, key))
            if r.metric is not None or not r.meta.sync_dist:
                continue
            if on_step:
                if r.last is not None:
                    requests.append((key, r.meta.reduce_fx, r.last, r.last.dtype))
            elif r.value is not None:
                requests.extend(_accumulator_requests(key, r))
        last_steps: list[_Result] = []
        if not on_step and self.training:  # the last step's synced values ride in the epoch read's collective
            for key, r in self._items.items():
                if r.meta.on_step and r.meta.sync_dist and r.metric is None and r.last is not None:
                    requests.append((key + _LAST, r.meta.reduce_fx, r.last, r.last.dtype))
                    last_steps.append(r)
        reduced, agreed = self._reduce(requests, "step" if on_step else "epoch", flags)
        if not on_step:
            self._epoch_read = True

        out = MetricsRead({}, {}, {}, agreed)
        for r, key in read:
            value = self._read_value(r, key, on_step, reduced)
            if value is None:
                continue
            meta = r.meta
            forked = meta.name + ("_step" if on_step else "_epoch") if meta.forked else meta.name
            if meta.logger:
                out.log[forked] = value
            if self.training or not on_step:
                out.callback[meta.name] = value
                out.callback[forked] = value
            if meta.prog_bar:
                out.pbar[forked] = value
        for r in last_steps:
            value = reduced.get(r.meta.fx + "." + r.meta.name + _LAST, r.last)
            out.callback[r.meta.name + "_step" if r.meta.forked else r.meta.name] = value
        return out

    @staticmethod
    def _read_value(r: _Result, key: str, on_step: bool, reduced: dict[str, Tensor]) -> Tensor | None:
        if r.metric is not None:
            if on_step:
                cache = r.metric._forward_cache
                return cache if isinstance(cache, Tensor) else None
            with warnings.catch_warnings():
                # A rank reset after a resume may compute before its next update.
                warnings.simplefilter("ignore", UserWarning)
                return r.metric.compute()
        if on_step:
            return reduced.get(key, r.last)
        if key in reduced:
            if r.meta.reduce_fx == "mean":
                return reduced[key] / reduced[key + "#weight"]
            return reduced[key]
        return r.epoch_value()

    # ------------------------------------------------------------------ sync
    def sync(self) -> None:
        """Replace every ``sync_dist`` accumulator by its cross-rank reduction (for a checkpoint).

        A collective: every rank must call it. ``unsync`` restores the local values.
        """
        if self._synced:
            return
        requests = []
        for key, r in self._items.items():
            if r.metric is None and r.meta.sync_dist and r.value is not None:
                requests.extend(_accumulator_requests(key, r))
        reduced, _ = self._reduce(requests, "sync")
        self._unsynced_state = {}
        for key, r in self._items.items():
            if key in reduced:
                self._unsynced_state[key] = (r.value, r.weight, r.pending, r.sizes)
                r.value, r.pending, r.sizes = reduced[key], [], []
                if r.meta.reduce_fx == "mean":
                    r.weight = reduced[key + "#weight"]
        for metric in self._metrics():
            if not metric._is_synced:
                metric.sync()
        self._synced = True

    def unsync(self) -> None:
        """Undo ``sync``: back to this rank's own values."""
        if not self._synced:
            return
        for key, (value, weight, pending, sizes) in self._unsynced_state.items():
            r = self._items[key]
            r.value, r.weight, r.pending, r.sizes = value, weight, pending, sizes
        self._unsynced_state = {}
        for metric in self._metrics():
            if metric._is_synced:
                metric.unsync()
        self._synced = False

    def _metrics(self) -> list[Metric]:
        seen: dict[int, Metric] = {}
        for r in self._items.values():
            if r.metric is not None:
                seen[id(r.metric)] = r.metric
        return list(seen.values())

    def _reduce(self, requests: list[tuple[str, str, Tensor | float, torch.dtype]], kind: str,
                flags: int = 0) -> tuple[dict[str, Tensor], int]:
        """Reduce all requests across ranks, after checking every rank holds the same layout.

        A request is ``(key, op, value, dtype)``; ``kind`` names the sync point ("step",
        "epoch", "sync"), which every rank reaches alike. See docs/metric-sync.md for
        the protocol: one collective per (op, dtype) buffer when the layout is the one
        agreed at the last sync point of this kind, a key check before them otherwise.
        Returns the reduced values by key and the OR of every rank's ``flags``.
        """
        if not 0 <= flags < 2**FLAG_BITS:
            raise ValueError(f"flags={flags}: sync points agree on {FLAG_BITS} bits, 0 <= flags < {2**FLAG_BITS}")
        if self.sync_fn is None:
            return {}, flags
        layout = tuple((key, op, dtype) for key, op, _, dtype in requests)
        device = next((t.device for _, _, t, _ in requests if isinstance(t, Tensor)), self.device)
        device = device or torch.device("cpu")
        agreed = self._agreed.get(kind)
        if agreed is not None:
            same = layout == agreed
            sent = requests if same else [(key, op, 0.0 if op == "weight" else torch.zeros((), dtype=dtype, device=device),
                                           dtype) for key, op, dtype in agreed]
            out, header = self._reduce_buffers(sent, device, [float(not same), *_bits(flags)])
            agreed_flags = sum(1 << i for i, bit in enumerate(header[1:]) if bit > 0)
            if header[0] == 0:
                return out, agreed_flags
            self._check_layout(layout, device, flags)  # some rank's keys changed: check them
        else:
            agreed_flags = self._check_layout(layout, device, flags)
        self._agreed[kind] = layout
        return self._reduce_buffers(requests, device)[0], agreed_flags

    def _reduce_buffers(self, requests: list[tuple[str, str, Tensor | float, torch.dtype]], device: torch.device,
                        header: list[float] | None = None) -> tuple[dict[str, Tensor], list[float]]:
        """One collective per (op, dtype); ``header`` (small counts, summed or maxed) rides in the first.

        Per buffer: step means (divided by the world size), other values, mean weights, a 1
        per rank for the world size, then the header: a section per kind of request, so
        every rank lays out the same keys alike. Each buffer is built by one ``stack`` and
        split by one ``unbind``: a read costs a few kernels whatever the number of values.
        Returns the reduced values by key and the reduced header.
        """
        assert self.sync_fn is not None
        groups: dict[tuple[str, torch.dtype], tuple[list, list, list]] = {}
        for key, op, t, dtype in requests:
            means, values, weights = groups.setdefault((_WIRE_OP.get(op, op), dtype), ([], [], []))
            (means if op == "mean" else weights if op == "weight" else values).append((key, t))
        if header is not None and not groups:
            groups[("sum", torch.float32)] = ([], [], [])
        out: dict[str, Tensor] = {}
        reduced_header: list[float] = []
        for i, ((op, dtype), (means, values, weights)) in enumerate(groups.items()):
            # Counts survive sum and max as they are; min gets them negated (min of -x is -max x).
            sign = -1.0 if op == "min" else 1.0
            head = [sign * h for h in header] if header is not None and i == 0 else []
            parts = [_scalar(t, dtype) for _, t in means + values]
            host = [w for _, w in weights] + ([1.0] if means else []) + head  # a 1 per rank sums to the world size
            if any(isinstance(w, Tensor) for w in host):  # weights restored from a synced checkpoint
                parts += [_scalar(torch.as_tensor(w, device=device), dtype) for w in host]
                buffer = torch.stack(parts)
            elif host:
                tail = torch.tensor(host, dtype=dtype, device=device)
                buffer = torch.cat((torch.stack(parts), tail)) if parts else tail
            else:
                buffer = torch.stack(parts)
            reduced = self.sync_fn(buffer, op)
            if head:
                end = buffer.shape[0] - len(head)
                reduced_header = [sign * h for h in reduced[end:].tolist()]
                reduced = reduced[:end]
            n_means = len(means)
            split = reduced[n_means:].unbind()
            if means:
                split = (reduced[:n_means] / reduced[-1]).unbind() + split
            out.update(zip([key for key, _ in means + values + weights], split))
        return out, reduced_header

    def _check_layout(self, layout: tuple, device: torch.device, flags: int) -> int:
        """One small max-reduction: do all ranks hold this layout? Also agrees ``flags`` (OR)."""
        assert self.sync_fn is not None
        if self._layout_cache is not None and self._layout_cache[0] == layout:
            digest = self._layout_cache[1]
        else:
            digest = int.from_bytes(hashlib.blake2b(repr(layout).encode(), digest_size=7).digest(), "big")
            self._layout_cache = (layout, digest)
        check = torch.tensor([digest, -digest, *_bits(flags)], dtype=torch.int64, device=device)
        hi, neg_lo, *bits = self.sync_fn(check, "max").tolist()
        if hi != -neg_lo:
            _raise_layout_mismatch(layout)
        return sum(bit << i for i, bit in enumerate(bits))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain data and tensors; Metric objects are replaced by their states."""
        items = {}
        for key, r in self._items.items():
            item: dict[str, Any] = {"meta": asdict(r.meta)}
            if r.metric is not None:
                item["metric_state"] = _metric_state(r.metric)
            else:
                item["value"] = r.value
                item["weight"] = r.weight
                item["pending"] = list(r.pending)
                item["sizes"] = list(r.sizes)
            items[key] = item
        return {"format": _STATE_FORMAT, "synced": self._synced, "items": items}

    def load_state_dict(
        self,
        state_dict: dict[str, Any],
        metrics: dict[str, Metric] | None = None,
        sync_fn: SyncFn | None = None,
    ) -> None:
        """Restore ``state_dict``, re-attaching Metric objects by ``metric_attribute``."""
        if sync_fn is not None:
            self.sync_fn = sync_fn
        self._items = {}
        self._layout_cache = None
        self._synced = False
        self._epoch_read = False
        metrics = metrics or {}
        for key, item in state_dict["items"].items():
            meta = _Meta(**item["meta"])
            args = (meta.on_step, meta.on_epoch, meta.reduce_fx, meta.sync_dist, meta.prog_bar,
                    meta.logger, meta.metric_attribute)
            r = _Result(meta, args)
            if "metric_state" in item:
                metric = metrics.get(meta.metric_attribute)
                if metric is None:
                    raise MisconfigurationError(
                        f"The checkpoint holds the state of torchmetrics Metric "
                        f"`{meta.metric_attribute}` (logged as `{meta.name}`), but the module has no "
                        f"Metric of that name; known: {sorted(metrics)}. Pass it with `metrics=`."
                    )
                _load_metric_state(metric, item["metric_state"])
                r.metric = metric
            else:
                value = item["value"]
                if value is not None and self.device is not None:
                    value = value.to(self.device)
                r.value = value
                r.weight = item["weight"]
                # Copies: a loaded tensor counts as changed in place (see ``_pending_total``).
                r.pending = [v.to(value.device, copy=True) for v in item.get("pending", [])]
                r.sizes = list(item.get("sizes", []))
            self._items[key] = r

    def reset(self, metrics: bool | None = None, fx: str | None = None) -> None:
        """Reset values to the reduction's identity; keep the logged keys.

        ``metrics=None`` resets tensors and Metric objects, ``False`` only tensors,
        ``True`` only Metric objects. ``fx`` limits it to one hook's values.
        """
        for r in self._items.values():
            if fx is not None and r.meta.fx != fx:
                continue
            if r.metric is not None:
                if metrics is not False:
                    r.metric.reset()
            elif metrics is not True:
                r.reset()

    def clear(self) -> None:
        """Forget every logged key and reset logged Metric objects: what a new epoch starts from."""
        for metric in self._metrics():
            metric.reset()
        self._items.clear()
        self._layout_cache = None
        self._epoch_read = False

    def keys(self) -> list[str]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"ResultCollection(training={self.training}, keys={self.keys()})"


def _accumulator_requests(key: str, r: _Result) -> list[tuple[str, str, Tensor | float, torch.dtype]]:
    value, weight = r.total()
    if r.meta.reduce_fx == "mean":
        return [(key, "sum", value, value.dtype), (key + "#weight", "weight", weight, value.dtype)]
    return [(key, r.meta.reduce_fx, value, value.dtype)]


def _bits(flags: int) -> list[int]:
    """``flags`` as ``FLAG_BITS`` zeros and ones, lowest first: reduced by max, or summed, each is an OR."""
    return [(flags >> i) & 1 for i in range(FLAG_BITS)]


def _scalar(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a 0-d tensor of ``dtype``; no kernel when it already is one."""
    return t if t.dtype is dtype and not t.ndim else t.to(dtype).reshape(())


def _describe(meta: _Meta) -> str:
    return (f"on_step={meta.on_step}, on_epoch={meta.on_epoch}, reduce_fx={meta.reduce_fx!r}, "
            f"sync_dist={meta.sync_dist}, prog_bar={meta.prog_bar}, logger={meta.logger}")


def _raise_layout_mismatch(layout: tuple) -> None:
    """Every rank gets here together: name what differs, per rank, then raise."""
    import torch.distributed as dist

    mine = [f"{key} ({op}, {dtype})" for key, op, dtype in layout]
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        every = sorted(set().union(*map(set, gathered)))
        lines = [
            f"  {entry}: present on ranks {[i for i, g in enumerate(gathered) if entry in g]}, "
            f"missing on ranks {[i for i, g in enumerate(gathered) if entry not in g]}"
            for entry in every
            if not all(entry in g for g in gathered)
        ]
        detail = "\n".join(lines)
        rank = dist.get_rank()
    else:
        detail = "  this rank holds: " + ", ".join(mine)
        rank = 0
    raise MisconfigurationError(
        f"Rank {rank}: the ranks logged different values to sync (name, reduction, dtype):\n"
        f"{detail}\nLog the same names with the same dtype on every rank before a sync point "
        "(or log rank-specific values with `sync_dist=False`)."
    )


def _metric_state(metric: Metric) -> dict[str, Any]:
    state: dict[str, Any] = dict(metric.metric_state)
    state["_update_count"] = metric._update_count
    return state


def _load_metric_state(metric: Metric, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if name == "_update_count":
            metric._update_count = value
        elif isinstance(value, list):
            setattr(metric, name, [v.to(metric.device) for v in value])
        else:
            setattr(metric, name, value.to(metric.device))
    metric._computed = None
