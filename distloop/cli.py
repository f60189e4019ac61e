"""The `distloop` command: compose the Hydra config once, write it into the run directory, train.

Three ways to run, one run directory each:

- ``distloop ...``: one process composes the config and trains.
- ``distloop launcher.nproc_per_node=N ...``: one process composes the config, writes the
  resolved ``config.yaml`` into the run directory and starts N ranks with torchrun; every
  rank reads that one file (``python -m distloop.worker RUN_DIR/config.yaml``).
- ``torchrun ... -m distloop ...`` or ``srun``: every rank starts here. Rank zero composes
  the config (only it writes Hydra's files) and broadcasts the run directory and resolved
  config to the others.

At its end, global rank zero draws the logged curves (``metrics.csv``) into ``RUN_DIR/curves.png``.

``distloop consolidate SRC DST`` is not a run: it writes a checkpoint as one file.
``distloop plot RUN_DIR [RUN_DIR ...] [-o OUT.png]`` is not a run either: it draws runs' curves.

Errors a user can fix (bad config, bad module, a non-finite loss) end the command with a
message on stderr and exit code 2, not a stack trace.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from distloop.checkpoint import CheckpointError, consolidate
from distloop.errors import MisconfigurationError
from distloop.loggers import CSVLogger, WandbLogger
from distloop.plot import plot_runs
from distloop.strategies import DDPStrategy, FSDPStrategy
from distloop.strategies.ddp import distributed_env, init_default_group
from distloop.strategies.devices import (check_backend, check_one_process, check_processes_per_node,
                                        check_strategy, uses_cuda)
from distloop.rng import seed_everything
from distloop.trainer import Trainer

EXIT_USER_ERROR = 2
_handoff = {"sent": False}  # under an outer launcher: whether rank zero has sent the config
# Collective timeout of the group that hands the config from rank zero to the others
# under an outer launcher (training itself uses the strategy's timeout_s).
BOOTSTRAP_TIMEOUT_S = float(os.environ.get("DISTLOOP_BOOTSTRAP_TIMEOUT_S", "600"))


def config_dir() -> str:
    """The packaged configs in a wheel install, the repository's ``configs/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "configs")


def instantiate(node: Any, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with errors that name the config entry to fix."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        shown = OmegaConf.to_container(node) if isinstance(node, DictConfig) else node
        raise MisconfigurationError(
            f"The `{where}` config needs a `_target_` naming the class to build, e.g. "
            f"`_target_: distloop.examples.digits.DigitsClassifier`; it has {shown!r}.")
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        raise MisconfigurationError(f"Could not build `{where}` ({node._target_}): {err}") from err


_PARALLEL = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}


def build_strategy(cfg: DictConfig) -> Any:
    """The Strategy (or its name) from the ``strategy`` group."""
    options = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(options, dict)
    name = options.pop("name", "auto")
    if name in _PARALLEL:
        options.pop("devices", None)
        precision = cfg.trainer.get("precision", "32")
        try:
            return _PARALLEL[name](precision=precision, **options)
        except TypeError as err:
            raise MisconfigurationError(f"Bad `strategy` config: {err}") from err
    return name


def build(cfg: DictConfig, run_dir: str) -> tuple[Trainer, Any, Any]:
    """Trainer, module and datamodule from a composed config."""
    if "trainer" not in cfg or "strategy" not in cfg:
        raise MisconfigurationError("The config needs `trainer` and `strategy` groups (see configs/config.yaml).")
    strategy = build_strategy(cfg)
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed)  # before the model is built, so its initial weights are the same every run
    module = instantiate(cfg.model, "model")
    datamodule = instantiate(cfg.data, "data")
    callbacks = [instantiate(node, f"callbacks.{name}") for name, node in (cfg.get("callbacks") or {}).items()]
    loggers = [instantiate(node, f"logger.{name}") for name, node in (cfg.get("logger") or {}).items()]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_args, dict)
    try:
        trainer = Trainer(
            **trainer_args,
            strategy=strategy,
            accelerator=cfg.strategy.get("accelerator", "auto"),
            devices=cfg.strategy.get("devices", "auto"),
            callbacks=callbacks,
            logger=loggers,
            default_root_dir=run_dir,
            seed=cfg.get("seed"),
        )
    except TypeError as err:  # an unknown trainer.<key>
        raise MisconfigurationError(f"Bad `trainer` config: {err}") from err
    return trainer, module, datamodule


def run(cfg: DictConfig, run_dir: str) -> float | None:
    """Train (and test) as the config says, on this rank; returns the monitored metric for sweeps."""
    trainer, module, datamodule = build(cfg, run_dir)
    trainer.config = OmegaConf.to_container(cfg, resolve=True)  # logged by fit, with the module's hparams
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from(cfg.get("resume", "auto")))
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    if cfg.get("test_after_fit", False):
        final.update(trainer.test(module, datamodule=datamodule)[0])
    if trainer.is_global_zero:
        summary = "  ".join(f"{k}={v:.4f}" for k, v in sorted(final.items()))
        print(f"distloop: done: {summary}\ndistloop: run directory {run_dir}", file=sys.stderr)
        plot_curves(trainer, run_dir)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.finish()  # the next job of a --multirun sweep (same process) starts its own run
    objective = cfg.get("objective")
    if objective and objective in trainer.callback_metrics:
        return float(trainer.callback_metrics[objective])
    return None


def plot_curves(trainer: Trainer, run_dir: str) -> None:
    """Draw the run's ``metrics.csv`` into ``run_dir/curves.png``. Training has succeeded by now,
    so a failure to draw (matplotlib missing, say) is a one-line note, not a failed run."""
    csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    if trainer.loggers and not csv_loggers:
        print("distloop: no curves.png: it is drawn from metrics.csv; add the CSV logger "
              "(e.g. logger=[csv,mlflow]) to get it.", file=sys.stderr)
    logged = [path for lg in csv_loggers if os.path.isfile(path := os.path.join(lg.log_dir, "metrics.csv"))]
    if not logged:  # logger=none, or nothing was logged
        return
    try:
        out = plot_runs(logged[:1], os.path.join(run_dir, "curves.png"))
    except Exception as err:  # noqa: BLE001 - a run that trained does not fail for its picture
        why = err if isinstance(err, MisconfigurationError) else f"{type(err).__name__}: {err}"
        print(f"distloop: warning: no curves.png: {why}", file=sys.stderr)
        return
    print(f"distloop: curves {out}", file=sys.stderr)


def resume_from(resume: str) -> str | None:
    """``fit``'s ``ckpt_path`` for the ``resume`` setting (see configs/config.yaml)."""
    if resume == "never":
        return None
    if resume == "auto":
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 or \
            int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
        return "last" if restarted else None
    return resume


def save_resolved(cfg: DictConfig, run_dir: str) -> tuple[DictConfig, str]:
    """Resolve every interpolation once and write ``config.yaml`` into the run directory."""
    os.makedirs(run_dir, exist_ok=True)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    path = os.path.join(run_dir, "config.yaml")
    OmegaConf.save(resolved, path)
    return resolved, path


def check_launch(cfg: DictConfig) -> int:
    """Refuse a launch that cannot work, before any process starts; returns the world size."""
    launcher, strategy = cfg.get("launcher") or {}, cfg.strategy
    nproc, nnodes = launcher.get("nproc_per_node", 1), launcher.get("nnodes", 1)
    for name, value in (("nproc_per_node", nproc), ("nnodes", nnodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MisconfigurationError(f"launcher.{name}={value!r} must be an int >= 1.")
    if nnodes > 1 and not launcher.get("rdzv_endpoint"):
        raise MisconfigurationError(
            f"launcher.nnodes={nnodes} needs launcher.rdzv_endpoint=HOST:PORT of node 0 (the same on every node).")
    name = strategy.get("name", "auto")
    check_strategy(name, config=True)
    world = nproc * nnodes
    check_one_process(name, world, config=True)
    use_cuda = uses_cuda(strategy.get("accelerator", "auto"), config=True)
    check_backend(strategy.get("backend"), use_cuda, config=True)
    if use_cuda:
        check_processes_per_node(nproc, f"launcher.nproc_per_node={nproc}")
    devices = strategy.get("devices", "auto")
    if devices not in ("auto", None) and devices != nproc:
        raise MisconfigurationError(f"strategy.devices={devices} disagrees with launcher.nproc_per_node={nproc}: "
                                    "set devices=auto (the launcher decides).")
    return world


def launch(launcher: DictConfig, config_path: str) -> int:
    """Start the ranks with torchrun; they all read ``config_path``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launcher.nproc_per_node}",
           f"--nnodes={launcher.nnodes}", f"--max-restarts={launcher.get('max_restarts', 0)}"]
    if launcher.nnodes == 1 and not launcher.get("rdzv_endpoint"):
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher.rdzv_endpoint}",
                f"--node-rank={launcher.get('node_rank', 0)}"]
    cmd += ["-m", "distloop.worker", config_path]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launcher.nproc_per_node)))
    return subprocess.call(cmd, env=env)


@contextmanager
def user_errors() -> Iterator[None]:
    """End on an error the user can fix (bad config or module, a non-finite loss, a bad checkpoint)
    with its message on stderr, naming the rank when there are several, and exit code 2: the
    message says what to change, and a stack trace would only bury it."""
    try:
        yield
    except (MisconfigurationError, FloatingPointError, CheckpointError) as err:
        rank, _, world = distributed_env()
        where = f" on rank {rank}" if world > 1 else ""
        print(f"distloop: error{where}: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _hydra_app(cfg: DictConfig) -> float | None:
    with user_errors():
        run_dir = HydraConfig.get().runtime.output_dir
        world = check_launch(cfg)
        resolved, path = save_resolved(cfg, run_dir)
        if dist.is_initialized():  # under an outer launcher: hand the config to the other ranks
            dist.broadcast_object_list([(run_dir, OmegaConf.to_container(resolved))], src=0)
            _handoff["sent"] = True
            return run(resolved, run_dir)
        if world > 1:
            code = launch(cfg.launcher, path)
            if code:
                sys.exit(code)
            return None
        return run(resolved, run_dir)


def _main_under_outer_launcher() -> None:
    """Every rank of a ``torchrun -m distloop`` / ``srun`` job: rank zero composes, the others receive."""
    rank, _, world = distributed_env()
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        if rank == 0:
            print("distloop: error: --multirun cannot run under torchrun/srun; sweep with the plain "
                  "`distloop` command instead.", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    init_default_group("gloo", rank, world, timedelta(seconds=BOOTSTRAP_TIMEOUT_S))
    try:
        if rank == 0:
            try:
                _hydra_app()
            finally:
                if not _handoff["sent"]:
                    dist.broadcast_object_list([None], src=0)  # tell the others to give up
            return
        payload: list[Any] = [None]
        dist.broadcast_object_list(payload, src=0)
        if payload[0] is None:
            print(f"distloop: rank {rank}: rank 0 failed before training; see its error.", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        run_dir, container = payload[0]
        with user_errors():
            run(OmegaConf.create(container), run_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def consolidate_command(argv: list[str]) -> None:
    """``distloop consolidate SRC DST``: a checkpoint (a sharded directory, or a file) as one file."""
    parser = argparse.ArgumentParser(
        prog="distloop consolidate",
        description="Write a checkpoint (an FSDP checkpoint directory, or a file) as one file holding the full "
                    "module state dict ('state_dict') and hyperparameters, readable with "
                    "torch.load(path, weights_only=True).")
    parser.add_argument("src", help="the checkpoint: a directory (strategy=fsdp) or a .ckpt file")
    parser.add_argument("dst", help="the file to write")
    parser.add_argument("--optimizer", action="store_true", help="also keep the optimizer states")
    args = parser.parse_args(argv)
    with user_errors():
        if os.path.realpath(args.src) == os.path.realpath(args.dst):
            raise MisconfigurationError("distloop consolidate: DST must differ from SRC.")
        consolidate(args.src, args.dst, optimizer=args.optimizer)
    print(f"distloop: wrote {args.dst}", file=sys.stderr)


def plot_command(argv: list[str]) -> None:
    """``distloop plot RUN_DIR ...``: the curves of one or several runs in one PNG."""
    parser = argparse.ArgumentParser(
        prog="distloop plot",
        description="Draw the logged curves of one or several runs into one PNG: a subplot per metric family "
                    "(loss with train and val together, acc, lr, ...), x axis the step; with several runs the "
                    "same metric shares a subplot, one colour per run.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run directory (its metrics.csv, or one up to two levels below it) or a metrics.csv")
    parser.add_argument("-o", "--output", default="curves.png",
                        help="the PNG to write (default: curves.png in the current directory)")
    args = parser.parse_args(argv)
    with user_errors():
        out = plot_runs(args.runs, args.output)
    print(f"distloop: wrote {out}", file=sys.stderr)


# Commands that are not a training run (which takes Hydra overrides, not a command name).
COMMANDS = {"consolidate": consolidate_command, "plot": plot_command}


def main() -> None:
    """Console entry point (`distloop` and `python -m distloop`)."""
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    elif distributed_env()[2] > 1:
        _main_under_outer_launcher()
    else:
        _hydra_app()


def worker_main(config_path: str) -> None:
    """One rank started by ``launch``: read the resolved config and train."""
    cfg = OmegaConf.load(config_path)
    with user_errors():
        run(cfg, cfg.run_dir)
