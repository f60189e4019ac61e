"""Fine-tuning: freeze parts of the module before training, unfreeze them into new param groups later.

As in Lightning, ``freeze_before_training`` runs in ``setup`` (before ``configure_optimizers``)
and ``finetune_function`` at every epoch start. Three things differ, because Lightning's
resume is inexact there: the checkpoint holds which parameters are trainable (a resumed run
trains the unfrozen backbone, instead of leaving it frozen), the param groups added so far
(rebuilt before the optimizer's state loads), and the epoch whose ``finetune_function`` has
run (an epoch resumed in its middle does not run it twice). Under DDP the strategy rebuilds
its gradient reducer when the set of trainable parameters changes, so unfrozen gradients are
averaged like the others.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from distloop.callbacks.callback import Callback
from distloop.errors import MisconfigurationError
from distloop.rank_zero import rank_zero_info, rank_zero_warn

Modules = Union[nn.Module, Iterable[Union[nn.Module, Iterable]]]


class BaseFinetuning(Callback):
    """Override ``freeze_before_training(module)`` and ``finetune_function(module, epoch, optimizer)``;
    make ``configure_optimizers`` take only ``filter(lambda p: p.requires_grad, self.parameters())``."""

    may_set_should_stop = False

    def __init__(self) -> None:
        # Per optimizer index, its param groups by parameter name: what a resume rebuilds.
        self._internal_optimizer_metadata: dict[int, list[dict[str, Any]]] = {}
        self._restored: dict[str, Any] | None = None
        self._finetuned_epoch = -1  # the last epoch whose finetune_function ran
        self._trainable: dict[str, list[str]] = {"parameters": [], "batchnorm": []}

    def state_dict(self) -> dict[str, Any]:
        return {"internal_optimizer_metadata": self._internal_optimizer_metadata,
                "finetuned_epoch": self._finetuned_epoch, "trainable": self._trainable}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._internal_optimizer_metadata = state_dict.get("internal_optimizer_metadata", state_dict)
        self._finetuned_epoch = state_dict.get("finetuned_epoch", -1)
        self._restored = state_dict

    # ------------------------------------------------------------ what to override
    def freeze_before_training(self, pl_module: Any) -> None:
        """Freeze what must not train at first (called in ``setup``)."""
        raise NotImplementedError

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze at the epochs you choose, e.g. with ``unfreeze_and_add_param_group``."""
        raise NotImplementedError

    # ------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._internal_optimizer_metadata, self._finetuned_epoch = {}, -1  # a new fit starts afresh
        self.freeze_before_training(pl_module)
        self._trainable = _trainable(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        restored, self._restored = self._restored, None
        if restored is None:
            return
        named = dict(pl_module.named_parameters())
        if "trainable" in restored:
            trainable = set(restored["trainable"]["parameters"])
            for name, param in named.items():
                param.requires_grad = name in trainable
            tracking = set(restored["trainable"]["batchnorm"])
            for name, mod in pl_module.named_modules():
                if isinstance(mod, _BatchNorm):
                    mod.track_running_stats = name in tracking
        for index, optimizer in enumerate(trainer.optimizers):
            for group in self._internal_optimizer_metadata.get(index, [])[len(optimizer.param_groups):]:
                optimizer.add_param_group({**group, "params": [named[n] for n in group["params"]]})

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self._finetuned_epoch:
            return  # resumed in this epoch's middle: its finetune_function ran before the checkpoint
        self._finetuned_epoch = trainer.current_epoch
        names = {p: n for n, p in pl_module.named_parameters()}
        for index, optimizer in enumerate(trainer.optimizers):
            self.finetune_function(pl_module, trainer.current_epoch, optimizer)
            stored = self._internal_optimizer_metadata.setdefault(index, [])
            stored.extend(_by_name(optimizer.param_groups[len(stored):], names))
        self._trainable = _trainable(pl_module)

    # ------------------------------------------------------------ tools for finetune_function
    @staticmethod
    def flatten_modules(modules: Modules) -> list[nn.Module]:
        """The leaf modules, and the parents that hold parameters themselves."""
        if isinstance(modules, nn.ModuleDict):
            modules = modules.values()
        if isinstance(modules, Iterable):
            found = [m for inner in modules for m in BaseFinetuning.flatten_modules(inner)]
        else:
            found = list(modules.modules())
        return [m for m in found if not list(m.children()) or m._parameters]

    @staticmethod
    def filter_params(modules: Modules, train_bn: bool = True, requires_grad: bool = True) -> Iterator[nn.Parameter]:
        """The parameters of ``modules`` whose ``requires_grad`` is ``requires_grad`` (BatchNorm's only with ``train_bn``)."""
        for mod in BaseFinetuning.flatten_modules(modules):
            if isinstance(mod, _BatchNorm) and not train_bn:
                continue
            for param in mod.parameters(recurse=False):
                if param.requires_grad == requires_grad:
                    yield param

    @staticmethod
    def make_trainable(modules: Modules) -> None:
        for mod in BaseFinetuning.flatten_modules(modules):
            if isinstance(mod, _BatchNorm):
                mod.track_running_stats = True
            for param in mod.parameters(recurse=False):
                param.requires_grad = True

    @staticmethod
    def freeze_module(module: nn.Module) -> None:
        if isinstance(module, _BatchNorm):
            module.track_running_stats = False
        for param in module.parameters(recurse=False):
            param.requires_grad = False

    @staticmethod
    def freeze(modules: Modules, train_bn: bool = True) -> None:
        """Freeze ``modules``; with ``train_bn`` their BatchNorm layers stay trainable."""
        for mod in BaseFinetuning.flatten_modules(modules):
            if isinstance(mod, _BatchNorm) and train_bn:
                BaseFinetuning.make_trainable(mod)
            else:
                BaseFinetuning.freeze_module(mod)

    @staticmethod
    def filter_on_optimizer(optimizer: Optimizer, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """``params`` less those ``optimizer`` holds already (the same tensor, not an equal one), with a warning."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = list(params)
        kept = [p for p in params if id(p) not in held]
        if len(kept) != len(params):
            rank_zero_warn("The provided params to be frozen already exist within another group of this optimizer. "
                           "Those parameters will be skipped.\nHINT: Did you init your optimizer in "
                           f"`configure_optimizer` as such:\n {type(optimizer)}(filter(lambda p: p.requires_grad, "
                           "self.parameters()), ...) ")
        return kept

    @staticmethod
    def unfreeze_and_add_param_group(modules: Modules, optimizer: Optimizer, lr: float | None = None,
                                     initial_denom_lr: float = 10.0, train_bn: bool = True) -> None:
        """Unfreeze ``modules`` and give their parameters to ``optimizer`` as a new group, at ``lr``
        (default: the first group's learning rate divided by ``initial_denom_lr``)."""
        BaseFinetuning.make_trainable(modules)
        group_lr = optimizer.param_groups[0]["lr"] / initial_denom_lr if lr is None else float(lr)
        params = BaseFinetuning.filter_on_optimizer(optimizer, BaseFinetuning.filter_params(modules, train_bn, True))
        if params:
            optimizer.add_param_group({"params": params, "lr": group_lr})


def _trainable(module: nn.Module) -> dict[str, list[str]]:
    """Which parameters train and which BatchNorm layers track statistics: what a resume restores."""
    return {"parameters": [n for n, p in module.named_parameters() if p.requires_grad],
            "batchnorm": [n for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]}


def _by_name(groups: list[dict[str, Any]], names: dict[nn.Parameter, str]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
            for g in groups]


def multiplicative(epoch: int) -> float:
    return 2.0


class BackboneFinetuning(BaseFinetuning):
    """Trains ``module.backbone`` from ``unfreeze_backbone_at_epoch`` on, as a new param group at
    ``backbone_initial_lr`` (default: the current learning rate times ``backbone_initial_ratio_lr``),
    its learning rate multiplied by ``lambda_func(epoch + 1)`` every later epoch and, with
    ``should_align``, never above the rest of the model's."""

    def __init__(self, unfreeze_backbone_at_epoch: int = 10, lambda_func: Callable[[int], float] = multiplicative,
                 backbone_initial_ratio_lr: float = 10e-2, backbone_initial_lr: float | None = None,
                 should_align: bool = True, initial_denom_lr: float = 10.0, train_bn: bool = True,
                 verbose: bool = False, rounding: int = 12) -> None:
        super().__init__()
        self.unfreeze_backbone_at_epoch = unfreeze_backbone_at_epoch
        self.lambda_func = lambda_func
        self.backbone_initial_ratio_lr = backbone_initial_ratio_lr
        self.backbone_initial_lr = backbone_initial_lr
        self.should_align = should_align
        self.initial_denom_lr = initial_denom_lr
        self.train_bn = train_bn
        self.verbose = verbose
        self.rounding = rounding
        self.previous_backbone_lr: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "previous_backbone_lr": self.previous_backbone_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous_backbone_lr = state_dict["previous_backbone_lr"]
        super().load_state_dict(state_dict)

    def freeze_before_training(self, pl_module: Any) -> None:
        if not isinstance(getattr(pl_module, "backbone", None), nn.Module):
            raise MisconfigurationError("The LightningModule should have a nn.Module `backbone` attribute")
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Optimizer) -> None:
        current_lr = optimizer.param_groups[0]["lr"]
        if epoch == self.unfreeze_backbone_at_epoch:
            backbone_lr = (self.backbone_initial_lr if self.backbone_initial_lr is not None
                           else current_lr * self.backbone_initial_ratio_lr)
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, backbone_lr, train_bn=self.train_bn,
                                              initial_denom_lr=self.initial_denom_lr)
        elif epoch > self.unfreeze_backbone_at_epoch and self.previous_backbone_lr is not None:
            backbone_lr = self.lambda_func(epoch + 1) * self.previous_backbone_lr
            if self.should_align and backbone_lr > current_lr:
                backbone_lr = current_lr
            optimizer.param_groups[-1]["lr"] = backbone_lr
        else:
            return
        self.previous_backbone_lr = backbone_lr
        if self.verbose:
            rank_zero_info(f"Current lr: {round(current_lr, self.rounding)}, "
                           f"Backbone lr: {round(backbone_lr, self.rounding)}")
