"""Loggers: CSV and TensorBoard, written from global rank zero only."""

from distloop.loggers.csv import CSVLogger
from distloop.loggers.logger import Logger
from distloop.loggers.tensorboard import TensorBoardLogger

__all__ = ["CSVLogger", "Logger", "TensorBoardLogger"]
