"""Loops: the ``Loop`` contract and the loops the Trainer runs."""

from distloop.loops.loop import Loop

__all__ = ["Loop"]
