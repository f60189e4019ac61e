"""Loops: the ``Loop`` contract and the loops the Trainer runs."""

from distloop.loops.evaluation import EvaluationLoop
from distloop.loops.fit import FitLoop
from distloop.loops.loop import Loop
from distloop.loops.optimization import AutomaticOptimization
from distloop.loops.prediction import PredictionLoop
from distloop.loops.training_epoch import TrainingEpochLoop

__all__ = ["AutomaticOptimization", "EvaluationLoop", "FitLoop", "Loop", "PredictionLoop", "TrainingEpochLoop"]
