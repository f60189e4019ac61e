"""Callbacks: hooks around the module's own, with Lightning's names: checkpoints, early stopping, a
wall-clock budget, fine-tuning, learning-rate logging, the model summary, the progress bars."""

from distloop.callbacks.callback import Callback
from distloop.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from distloop.callbacks.finetuning import BackboneFinetuning, BaseFinetuning
from distloop.callbacks.lr_monitor import LearningRateMonitor
from distloop.callbacks.model_checkpoint import ModelCheckpoint
from distloop.callbacks.model_summary import ModelSummary, summarize
from distloop.callbacks.progress import ProgressBar
from distloop.callbacks.rich_model_summary import RichModelSummary
from distloop.callbacks.rich_progress import RichProgressBar, RichProgressBarTheme
from distloop.callbacks.timer import Timer
from distloop.callbacks.tqdm_progress import TQDMProgressBar
from distloop.extras import available


def default_progress_bar() -> ProgressBar:
    """The Trainer's bar when none is given, Lightning's rule (2.6+): rich's where rich is installed."""
    return RichProgressBar() if available("rich") else TQDMProgressBar()


def default_model_summary() -> ModelSummary:
    """The Trainer's summary when none is given, by the same rule as the bar."""
    return RichModelSummary() if available("rich") else ModelSummary()


__all__ = ["BackboneFinetuning", "BaseFinetuning", "Callback", "EarlyStopping", "EarlyStoppingReason",
           "LearningRateMonitor", "ModelCheckpoint", "ModelSummary", "ProgressBar", "RichModelSummary",
           "RichProgressBar", "RichProgressBarTheme", "TQDMProgressBar", "Timer", "default_model_summary",
           "default_progress_bar", "summarize"]
