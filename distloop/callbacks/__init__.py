"""Callbacks: hooks around the module's own; checkpoints, early stopping, the model summary, the progress bar."""

from distloop.callbacks.callback import Callback
from distloop.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from distloop.callbacks.model_checkpoint import ModelCheckpoint
from distloop.callbacks.model_summary import ModelSummary, summarize
from distloop.callbacks.progress import ProgressBar

__all__ = ["Callback", "EarlyStopping", "EarlyStoppingReason", "ModelCheckpoint", "ModelSummary", "ProgressBar",
           "summarize"]
