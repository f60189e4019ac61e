"""distloop: readable, replaceable PyTorch training loops that resume exactly, on one or many devices."""

from distloop import progress
from distloop.callbacks import Callback, EarlyStopping, ModelCheckpoint, ModelSummary, ProgressBar
from distloop.checkpoint import CheckpointError
from distloop.datamodule import DataModule
from distloop.errors import MisconfigurationError, Preempted
from distloop.loops import Loop
from distloop.module import LoopModule
from distloop.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from distloop.results import ResultCollection
from distloop.rng import seed_everything
from distloop.stages import RunningStage, TrainerFn, TrainerStatus
from distloop.trainer import Trainer

__all__ = [
    "Callback",
    "CheckpointError",
    "DataModule",
    "EarlyStopping",
    "Loop",
    "LoopModule",
    "MisconfigurationError",
    "ModelCheckpoint",
    "ModelSummary",
    "Preempted",
    "ProgressBar",
    "ResultCollection",
    "RunningStage",
    "Trainer",
    "TrainerFn",
    "TrainerStatus",
    "progress",
    "rank_zero_info",
    "rank_zero_only",
    "rank_zero_warn",
    "seed_everything",
]
__version__ = "0.1.0"
