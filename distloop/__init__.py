"""distloop: readable, replaceable PyTorch training loops that resume exactly, on one or many devices."""

from distloop import progress
from distloop.errors import MisconfigurationError
from distloop.loops import Loop
from distloop.results import ResultCollection

__all__ = ["Loop", "MisconfigurationError", "ResultCollection", "progress"]
__version__ = "0.1.0"
