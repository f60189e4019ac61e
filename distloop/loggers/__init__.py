"""Loggers: CSV and TensorBoard, written from global rank zero only."""

from distloop.loggers.csv import CSVLogger
from distloop.loggers.logger import Logger, agree_on_versions
from distloop.loggers.resolve import resolve_loggers
from distloop.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger", "agree_on_versions", "resolve_loggers"]
