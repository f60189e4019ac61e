"""distloop: readable, replaceable PyTorch training loops that resume exactly, on one or many devices."""

from distloop import progress
from distloop.callbacks import Callback, EarlyStopping, ProgressBar
from distloop.datamodule import DataModule
from distloop.errors import MisconfigurationError
from distloop.loops import Loop
from distloop.module import LoopModule
from distloop.results import ResultCollection
from distloop.trainer import Trainer, seed_everything

__all__ = [
    "Callback",
    "DataModule",
    "EarlyStopping",
    "Loop",
    "LoopModule",
    "MisconfigurationError",
    "ProgressBar",
    "ResultCollection",
    "Trainer",
    "progress",
    "seed_everything",
]
__version__ = "0.1.0"
