"""Loggers: CSV, TensorBoard, Weights & Biases and MLflow, written from global rank zero only.

``WandbLogger`` and ``MLFlowLogger`` need their extras (``pip install 'distloop[wandb]'``,
``'distloop[mlflow]'``); importing this package imports neither ``wandb`` nor ``mlflow``.
"""

from distloop.loggers.csv import CSVLogger
from distloop.loggers.logger import Logger, agree_on_versions
from distloop.loggers.mlflow import MLFlowLogger
from distloop.loggers.resolve import resolve_loggers
from distloop.loggers.tensorboard import TensorBoardLogger
from distloop.loggers.wandb import WandbLogger

__all__ = ["CSVLogger", "Logger", "MLFlowLogger", "TensorBoardLogger", "WandbLogger", "agree_on_versions",
           "resolve_loggers"]
