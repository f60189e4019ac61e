"""Callbacks: hooks around the module's own, plus early stopping and the progress bar."""

from distloop.callbacks.callback import Callback
from distloop.callbacks.early_stopping import EarlyStopping
from distloop.callbacks.model_checkpoint import ModelCheckpoint
from distloop.callbacks.progress import ProgressBar

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "ProgressBar"]
