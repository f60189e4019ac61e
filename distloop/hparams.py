"""Hyperparameters, as in Lightning: ``save_hyperparameters``, ``hparams``, and a module rebuilt from a checkpoint.

``save_hyperparameters()`` records the arguments the object's ``__init__`` (and the
``__init__`` of each subclass that called it) was given; ``load_from_checkpoint`` builds
the class again from them with ``cls(**hparams)`` and loads the weights.

A checkpoint holds plain data only, so ``torch.load(path, weights_only=True)`` reads it and
nothing is ever unpickled. The hparams are encoded for it (and for the logged hparams):
numbers, strings, bools, ``None`` and lists / tuples / dicts of them are kept as they are;
an importable class or function becomes ``{"_import_": "module:qualname"}``; a
``functools.partial`` of one, with encodable arguments, becomes ``{"_partial_":
"module:qualname", "args": [...], "keywords": {...}}``. Anything else (a tensor, an
``nn.Module``, an arbitrary object) is left out with a warning; pass it to
``load_from_checkpoint`` instead. Decoding imports the named modules: load checkpoints
you trust, as with any code you run.
"""

from __future__ import annotations

import ast
import copy
import csv
import functools
import importlib
import inspect
import os
import types
import warnings
from argparse import Namespace
from collections.abc import Mapping, MutableMapping
from dataclasses import fields, is_dataclass
from typing import IO, Any, Callable, Sequence, TypeVar, Union

import torch
from torch import nn

from distloop.checkpoint import FORMAT, VERSION, CheckpointError, load, upgrade
from distloop.errors import MisconfigurationError

IMPORT_KEY = "_import_"
PARTIAL_KEY = "_partial_"
MODULE_KEYS = ("hyper_parameters", "hparams_name")  # Lightning's checkpoint keys for a module's hparams
DATAMODULE_KEYS = ("datamodule_hyper_parameters", "datamodule_hparams_name")  # ... and for a datamodule's

_PLAIN = (bool, int, float, str, type(None))
_PRIMITIVES = (bool, int, float, str)
_T = TypeVar("_T")
_Path = Union[str, os.PathLike]


class AttributeDict(dict):
    """A dict whose items are attributes too: ``hparams.lr`` is ``hparams["lr"]``."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'") from err

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError as err:
            raise AttributeError(key) from err

    def __repr__(self) -> str:
        """One ``"key": value`` row per item, sorted and aligned, as Lightning prints hparams."""
        if not self:
            return ""
        width = max(len(str(k)) for k in self) + 3
        labels = {k: f'"{k}":' for k in self}
        return "\n".join(f"{labels[k]:<{width}} {self[k]}" for k in sorted(self, key=str))


class HyperparametersMixin:
    """``save_hyperparameters``, ``hparams`` and ``hparams_initial``, for ``LoopModule`` and ``DataModule``."""

    _log_hyperparams = False  # whether the Trainer logs them: set by save_hyperparameters(logger=...)

    def save_hyperparameters(
        self,
        *args: Any,
        ignore: Sequence[str] | str | None = None,
        frame: types.FrameType | None = None,
        logger: bool = True,
    ) -> None:
        """Record ``__init__``'s arguments in ``self.hparams`` (and the checkpoint), as Lightning does.

        With no ``args``: every argument of the calling ``__init__`` and of the ``__init__``
        of each subclass above it on the stack (``*args`` values are left out, ``**kwargs``
        items are included). String ``args`` name the arguments to keep; a single dict,
        ``Namespace`` or dataclass argument is saved as the hparams. ``ignore``: a name or
        names to leave out. An ``nn.Module`` argument is left out with a warning (its
        weights are in the ``state_dict``). ``logger=False``: not sent to the loggers.
        """
        self._log_hyperparams = logger
        if len(args) == 1 and not args[0]:  # an empty container: nothing to save
            return
        if frame is None:
            current = inspect.currentframe()
            frame = current.f_back if current is not None else None
        if frame is None:
            raise AttributeError("save_hyperparameters() needs the caller's frame, and none is available.")

        if is_dataclass(self):
            init_args = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        else:
            init_args = _init_args_in_stack(frame, self)
        del frame
        if ignore is None:
            ignore = []
        elif isinstance(ignore, str):
            ignore = [ignore]
        ignore = list({name for name in ignore if isinstance(name, str)})
        init_args = {k: v for k, v in init_args.items() if k not in ignore}

        objects = [a for a in args if not isinstance(a, str)]
        if not args:
            hp: Any = init_args
            self._hparams_name = "kwargs" if hp else None
        elif len(objects) == 1:
            hp = objects[0]
            self._hparams_name = next((k for k, v in init_args.items() if _same(v, hp)), None)
        else:
            missing = [a for a in args if isinstance(a, str) and a not in init_args]
            if missing:
                raise KeyError(f"save_hyperparameters{tuple(missing)}: no such __init__ argument of "
                               f"{type(self).__name__} (or it is ignored).")
            hp = {a: init_args[a] for a in args if isinstance(a, str)}
            self._hparams_name = "kwargs"

        self._set_hparams(hp)
        self.remove_ignored_hparams(ignore)
        for name, value in list(self._hparams.items()):
            if isinstance(value, nn.Module):
                _warn(f"{type(self).__name__}: hparam {name!r} is an `nn.Module`: it stays in `self.hparams` but is "
                      f"left out of checkpoints (its weights are saved with the state_dict). Ignore it with "
                      f"`self.save_hyperparameters(ignore=[{name!r}])` and pass it when loading: "
                      f"`load_from_checkpoint(path, {name}=...)`.", stacklevel=2)
        self._hparams_initial = copy.deepcopy(self._hparams)

    def _set_hparams(self, hp: Any) -> None:
        if isinstance(hp, Namespace):
            hp = vars(hp)
        elif is_dataclass(hp) and not isinstance(hp, type):
            hp = {f.name: getattr(hp, f.name) for f in fields(hp) if f.init}
        if isinstance(hp, dict):
            hp = AttributeDict(hp)
        elif isinstance(hp, _PRIMITIVES):
            raise ValueError(f"Primitives {_PRIMITIVES} are not allowed.")
        elif not isinstance(hp, MutableMapping):
            raise ValueError(f"Unsupported config type of {type(hp)}.")
        if isinstance(hp, dict) and isinstance(self.hparams, dict):
            self.hparams.update(hp)  # a subclass's call adds to its base class's
        else:
            self._hparams = hp

    def remove_ignored_hparams(self, ignore_list: list[str]) -> None:
        """Drop these names from the hparams (a subclass may drop what its base class saved)."""
        for key in ignore_list:
            self.hparams.pop(key, None)

    @property
    def hparams(self) -> AttributeDict | MutableMapping:
        """The saved hyperparameters; yours to change (``hparams_initial`` keeps the first values)."""
        if not hasattr(self, "_hparams"):
            self._hparams = AttributeDict()
        return self._hparams

    @property
    def hparams_initial(self) -> AttributeDict:
        """A copy of the hyperparameters as ``save_hyperparameters`` recorded them."""
        if not hasattr(self, "_hparams_initial"):
            return AttributeDict()
        return copy.deepcopy(self._hparams_initial)


def _init_args_in_stack(frame: types.FrameType, obj: Any) -> dict[str, Any]:
    """The arguments of the ``__init__`` frames of ``obj`` on the stack from ``frame`` up, the
    outermost (the most derived class's) winning, as Lightning's ``collect_init_args``.

    The frames above ``frame`` that are not ``obj``'s ``__init__`` are skipped until one is
    found; the first one after that ends the walk.
    """
    found: list[dict[str, Any]] = []
    current: types.FrameType | None = frame
    while current is not None:
        args = _init_args(current, obj)
        if args is not None:
            found.append(args)
        elif found:
            break
        current = current.f_back
    del current
    merged: dict[str, Any] = {}
    for args in found:
        merged.update(args)
    return merged


def _init_args(frame: types.FrameType, obj: Any) -> dict[str, Any] | None:
    """The arguments of ``frame`` when it is an ``__init__`` of ``obj``, else ``None``."""
    if frame.f_code.co_name != "__init__":
        return None
    names, _, varkw, values = inspect.getargvalues(frame)
    if not names or values.get(names[0]) is not obj:
        return None
    args = {name: values[name] for name in names[1:] if name in values}
    if varkw is not None:
        args.update(values.get(varkw, {}))
    return args


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an array or tensor compared with a dict has no truth value
        return False


def _warn(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn`` on global rank zero only (every rank builds the checkpoint's hparams);
    ``stacklevel`` counts from the caller, as ``warnings.warn`` does."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


# ------------------------------------------------------------ plain-data encoding
class _NotPlain(Exception):
    """A value that the checkpoint cannot hold as plain data."""


def encode_hparams(hparams: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """``hparams`` as plain data (see the module's docstring); each value that is not, left out with a
    warning naming it and ``owner`` (the class whose hparams they are)."""
    encoded = {}
    for name, value in hparams.items():
        try:
            encoded[name] = _encode(value)
        except _NotPlain:
            _warn(f"{owner}: hparam {name!r} ({type(value).__name__}) is not plain data (numbers, strings, "
                  "bools, None, lists/tuples/dicts of those) nor an importable class, function or "
                  "functools.partial of one; it is left out of the checkpoint and the logged hparams. Pass it "
                  f"when loading: `{owner}.load_from_checkpoint(path, {name}=...)`.")
    return encoded


def _encode(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind in (list, tuple):
        return kind(_encode(v) for v in value)
    if isinstance(value, Mapping):
        return {_encode_key(k): _encode(v) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {PARTIAL_KEY: _import_path(value.func), "args": [_encode(a) for a in value.args],
                "keywords": {k: _encode(v) for k, v in value.keywords.items()}}
    return {IMPORT_KEY: _import_path(value)}


def _encode_key(key: Any) -> Any:
    if type(key) not in _PLAIN:
        raise _NotPlain(key)
    return key


def _import_path(obj: Any) -> str:
    """``"module:qualname"`` of an importable class or function (it imports back to ``obj`` itself)."""
    if not (isinstance(obj, type) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
        raise _NotPlain(obj)
    module_name = getattr(obj, "__module__", None)
    if not module_name:
        raise _NotPlain(obj)
    for name in dict.fromkeys((getattr(obj, "__qualname__", ""), getattr(obj, "__name__", ""))):
        if name and "<" not in name:  # "<locals>", "<lambda>": not importable
            try:
                if _resolve(f"{module_name}:{name}") is obj:
                    return f"{module_name}:{name}"
            except (ImportError, AttributeError):
                pass
    raise _NotPlain(obj)


def _resolve(path: str) -> Any:
    module_name, _, qualname = path.partition(":")
    target = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def decode_hparams(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The hparams ``encode_hparams`` wrote, with their classes, functions and partials imported again.

    A record whose module or name no longer imports raises ``CheckpointError`` naming the
    hparam (pass a value for it to ``load_from_checkpoint`` instead).
    """
    decoded = {}
    for name, value in saved.items():
        try:
            decoded[name] = _decode(value)
        except (ImportError, AttributeError) as err:
            raise CheckpointError(f"hparam {name!r} names a class or function that does not import "
                                  f"({type(err).__name__}: {err}); pass `{name}=...` to load_from_checkpoint.") from err
    return decoded


def _decode(value: Any) -> Any:
    kind = type(value)
    if kind in (list, tuple):
        return kind(_decode(v) for v in value)
    if kind is not dict:
        return value
    if value.keys() == {IMPORT_KEY} and isinstance(value[IMPORT_KEY], str):
        return _resolve(value[IMPORT_KEY])
    if value.keys() == {PARTIAL_KEY, "args", "keywords"} and isinstance(value[PARTIAL_KEY], str):
        return functools.partial(_resolve(value[PARTIAL_KEY]), *_decode(value["args"]),
                                 **_decode(value["keywords"]))
    return {k: _decode(v) for k, v in value.items()}


def checkpoint_hparams(obj: Any) -> dict[str, Any]:
    """What a checkpoint holds of ``obj``'s hparams (``{}`` for no object, or one that saved none)."""
    if not isinstance(obj, HyperparametersMixin):
        return {}
    return encode_hparams(obj.hparams, type(obj).__name__)


def hparams_name(obj: Any) -> str | None:
    """Lightning's ``hparams_name``: the ``__init__`` argument a single saved dict came from, or
    ``"kwargs"`` for saved arguments; ``load_from_checkpoint`` passes the dict back under it."""
    return getattr(obj, "_hparams_name", None)


def merged_hparams(module: Any, datamodule: Any) -> dict[str, Any]:
    """What the loggers get: the module's initial hparams and the datamodule's, as plain data.

    Only those saved with ``logger=True`` (the default) are included; ``{}`` when there are
    none. A key both hold with different values raises ``RuntimeError``, as in Lightning.
    """
    module_logs = getattr(module, "_log_hyperparams", False)
    datamodule_logs = datamodule is not None and getattr(datamodule, "_log_hyperparams", False)
    ours = module.hparams_initial if module_logs else {}
    theirs = datamodule.hparams_initial if datamodule_logs else {}
    clashing = [k for k in ours.keys() & theirs.keys() if k != "_class_path" and _differ(ours[k], theirs[k])]
    if clashing:
        raise RuntimeError(f"Error while merging hparams: the keys {sorted(clashing)} are present in both the "
                           "LoopModule's and DataModule's hparams but have different values.")
    merged = {**encode_hparams(ours, type(module).__name__), **encode_hparams(theirs, type(datamodule).__name__)}
    merged.pop("_class_path", None)  # LightningCLI's own, never logged
    return merged


def _differ(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return True
    if isinstance(a, torch.Tensor):
        return a is not b
    return not _same(a, b)


# ------------------------------------------------------------ load_from_checkpoint
def load_module(
    cls: type[_T],
    checkpoint_path: _Path | IO,
    map_location: Any = None,
    hparams_file: _Path | None = None,
    strict: bool | None = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> _T:
    """``LoopModule.load_from_checkpoint``: ``cls(**hparams)`` (``kwargs`` override them), then the
    module's ``on_load_checkpoint(checkpoint)`` and its ``state_dict``; on the device of the saved
    tensors, in training mode, as Lightning returns it."""
    checkpoint = _read(checkpoint_path, map_location, weights_only)
    module: Any = _build(cls, checkpoint, MODULE_KEYS, checkpoint_path, hparams_file, kwargs)
    strict = True if strict is None else strict
    module.on_load_checkpoint(checkpoint)
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"{checkpoint_path} holds no 'state_dict'.")
    state_dict = checkpoint["state_dict"]
    keys = module.load_state_dict(state_dict, strict=strict)
    if not strict:
        if keys.missing_keys:
            _warn(f"Found keys that are in the model state dict but not in the checkpoint: {keys.missing_keys}")
        if keys.unexpected_keys:
            _warn(f"Found keys that are not in the model state dict but in the checkpoint: {keys.unexpected_keys}")
    if not state_dict:
        _warn(f"The state dict in {checkpoint_path!r} contains no parameters.")
        return module
    device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))
    return module.to(device)


def load_datamodule(
    cls: type[_T],
    checkpoint_path: _Path | IO,
    map_location: Any = None,
    hparams_file: _Path | None = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> _T:
    """``DataModule.load_from_checkpoint``: ``cls(**datamodule_hparams)``, ``kwargs`` overriding them."""
    checkpoint = _read(checkpoint_path, map_location, weights_only)
    return _build(cls, checkpoint, DATAMODULE_KEYS, checkpoint_path, hparams_file, kwargs)


def _read(path: _Path | IO, map_location: Any, weights_only: bool | None) -> dict[str, Any]:
    """A distloop or Lightning checkpoint, read with ``weights_only=True`` (never unpickled)."""
    if weights_only is False:
        raise MisconfigurationError("load_from_checkpoint(weights_only=False): distloop checkpoints hold plain "
                                    "data only and are always read with weights_only=True.")
    is_path = isinstance(path, (str, os.PathLike))
    if is_path and os.path.isdir(path):  # a sharded checkpoint: its full tensors, read onto the CPU
        state = load(os.fspath(path))
        if isinstance(map_location, (str, torch.device)):
            state["state_dict"] = {k: v.to(map_location) for k, v in state.get("state_dict", {}).items()}
        return state
    if is_path and not os.path.isfile(path):
        raise CheckpointError(f"No checkpoint file at {path}.")
    try:
        state = torch.load(path, map_location=map_location or _default_map_location, weights_only=True,
                           mmap=is_path)
    except Exception as err:  # noqa: BLE001 - any failure to read means the same to the user
        raise CheckpointError(f"{path} is not a checkpoint torch.load(weights_only=True) can read (truncated, "
                              f"corrupt, holding pickled objects, or another kind of file): "
                              f"{type(err).__name__}: {str(err)[:300]}") from err
    if isinstance(state, dict) and state.get("format") == FORMAT:
        if state.get("version", 0) > VERSION:
            raise CheckpointError(f"{path} has format version {state['version']}; this distloop reads up to "
                                  f"{VERSION}. Upgrade distloop.")
        return upgrade(state)
    if isinstance(state, dict) and "pytorch-lightning_version" in state:
        return state
    raise CheckpointError(f"{path} is neither a distloop checkpoint (no '{FORMAT}' marker) nor a Lightning one.")


def _default_map_location(storage: Any, location: str) -> Any:
    """Lightning's default: tensors stay on the device they were saved from, or the CPU when it is absent."""
    if (location.startswith("cuda") and not torch.cuda.is_available()
            or location.startswith("mps") and not torch.backends.mps.is_available()):
        return storage.cpu()
    return None


def _build(cls: Callable[..., _T], checkpoint: dict[str, Any], keys: tuple[str, str], path: Any,
           hparams_file: _Path | None, overrides: dict[str, Any]) -> _T:
    """``cls`` built from the saved hparams, as Lightning's ``_load_state`` builds it."""
    hparams_key, name_key = keys
    if hparams_file is not None:
        checkpoint[hparams_key] = _read_hparams_file(hparams_file)
    saved = checkpoint.get(hparams_key) or {}
    hparams = decode_hparams({k: v for k, v in saved.items() if k not in overrides})
    hparams.update(overrides)
    checkpoint[hparams_key] = hparams  # what on_load_checkpoint sees, overrides included

    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # type: ignore[misc]
    named = {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    init_name = checkpoint.get(name_key)
    if init_name and init_name in named:  # the hparams were one dict argument: pass them back as it
        init_kwargs: dict[str, Any] = {init_name: AttributeDict(hparams)}
    else:
        init_kwargs = dict(hparams)
    init_kwargs.update(overrides)
    if not takes_any:
        init_kwargs = {k: v for k, v in init_kwargs.items() if k in named}
    missing = [name for name, p in named.items()
               if p.default is p.empty and p.kind is not p.POSITIONAL_ONLY and name not in init_kwargs]
    if missing:
        example = ", ".join(f"{name}=..." for name in missing)
        raise MisconfigurationError(
            f"{cls.__name__}.__init__ needs {missing}, which {path} does not hold (not saved with "
            f"save_hyperparameters, or left out as not plain data): pass it, "
            f"`{cls.__name__}.load_from_checkpoint(path, {example})`.")
    return cls(**init_kwargs)


def _read_hparams_file(path: _Path) -> dict[str, Any]:
    """Lightning's ``hparams_file``: a ``.yaml`` / ``.yml`` mapping, or a ``key,value`` ``.csv``."""
    extension = str(path).rsplit(".", 1)[-1].lower()
    if extension not in ("csv", "yml", "yaml"):
        raise ValueError(".csv, .yml or .yaml is required for `hparams_file`")
    if not os.path.isfile(path):
        _warn(f"hparams_file {path} does not exist; the module is built from load_from_checkpoint's arguments "
              "only.")
        return {}
    with open(path, newline="") as f:
        if extension == "csv":
            return {row[0]: _literal(row[1]) for row in list(csv.reader(f))[1:]}
        import yaml

        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise MisconfigurationError(f"hparams_file {path} holds a {type(loaded).__name__}, not a mapping of hparams.")
    return loaded


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
