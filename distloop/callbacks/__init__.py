"""Callbacks: hooks around the module's own, with Lightning's names: checkpoints, early stopping, a
wall-clock budget, fine-tuning, learning-rate logging, the model summary, the progress bar."""

from distloop.callbacks.callback import Callback
from distloop.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from distloop.callbacks.finetuning import BackboneFinetuning, BaseFinetuning
from distloop.callbacks.lr_monitor import LearningRateMonitor
from distloop.callbacks.model_checkpoint import ModelCheckpoint
from distloop.callbacks.model_summary import ModelSummary, summarize
from distloop.callbacks.progress import ProgressBar
from distloop.callbacks.timer import Timer

__all__ = ["BackboneFinetuning", "BaseFinetuning", "Callback", "EarlyStopping", "EarlyStoppingReason",
           "LearningRateMonitor", "ModelCheckpoint", "ModelSummary", "ProgressBar", "Timer", "summarize"]
