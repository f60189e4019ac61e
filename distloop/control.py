"""The control plane: requests to stop, preempt, save or fail, and the decisions every rank agrees on.

Any rank may make a *request*: a callback sets ``trainer.should_stop``, SIGTERM or SIGUSR1
arrives (a preemption notice), a callback's clock says a timed save is due, a background
checkpoint write fails. Acting on a request where only some ranks made it would leave the
others waiting in a collective, so the loops act only on *decisions*: the OR of every
rank's requests, agreed at the next metrics read (the request bits ride inside that read's
buffers: no collective of their own, see docs/metric-sync.md) or, at epoch end, by a vote.
With one process a request is already a decision.

A stop decision holds until the run ends; save, preemption and failure decisions are used
once, at the next point the run can be resumed from exactly (``Trainer.at_resumable_point``).
"""

from __future__ import annotations

import enum
import signal
import threading
from typing import Any


class Request(enum.IntFlag):
    """What a rank can ask for; each is one bit of a metrics read's flags."""

    PREEMPT = 1  # a preemption signal: save, then exit with Preempted
    SAVE = 2  # a timed save is due (ModelCheckpoint(train_time_interval=...))
    STOP = 4  # trainer.should_stop: end fit at the next epoch boundary the loops allow
    FAIL = 8  # this rank failed (a background checkpoint write): every rank stops with an error


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before the end of a job
# Plain ints inside: IntFlag arithmetic costs a Python call, and some of this runs every step.
_PREEMPT, _STOP = int(Request.PREEMPT), int(Request.STOP)
_ONE_SHOT = int(Request.PREEMPT | Request.SAVE | Request.FAIL)


class Control:
    """This rank's requests and the agreed decisions, for one run."""

    def __init__(self) -> None:
        self._requests = 0
        self._decisions = 0
        self._single = True
        self._previous_handlers: dict[int, Any] = {}
        # Set by the signal handler, and cleared only once the preemption has been acted on: a
        # handler runs between any two bytecodes, so it never read-modify-writes shared state.
        self._signalled = False
        # Read at every step, so plain attributes, kept in step with the decisions by _set_decisions.
        self.stop_decided = False  # decided(Request.STOP)
        self.anything_decided = False  # a save, preemption or failure to act on at the next resumable point

    def start(self, world_size: int, catch_signals: bool) -> None:
        """Forget the last run's requests; with ``catch_signals``, turn SIGTERM / SIGUSR1 into PREEMPT."""
        self._single = world_size == 1
        self._requests = 0
        self._signalled = False
        self._set_decisions(0)
        if catch_signals and threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def finish(self) -> None:
        """Give the signals back to whoever handled them before ``start``."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True
        if self._single:
            self.anything_decided = True

    # ------------------------------------------------------------ requests
    def request(self, what: Request) -> None:
        """Ask, from this rank, for ``what``; it is acted on once the ranks agree."""
        self._requests |= int(what)
        if self._single:
            self._set_decisions(self._decisions | int(what))

    def withdraw(self, what: Request) -> None:
        """Take back a request not yet agreed on (``trainer.should_stop = False``)."""
        self._requests &= ~int(what)
        if self._single:
            self._set_decisions(self._decisions & ~int(what))

    def requested(self, what: Request) -> bool:
        return bool(self.pending & int(what))

    @property
    def pending(self) -> int:
        """The request bits this rank sends with the next metrics read."""
        return self._requests | (_PREEMPT if self._signalled else 0)

    # ------------------------------------------------------------ decisions
    def agree(self, agreed: int) -> None:
        """Record what a metrics read agreed on (the OR of every rank's ``pending``)."""
        self._requests &= ~(agreed & _ONE_SHOT)  # answered: not sent again
        self._set_decisions(self._decisions | agreed)

    def decide(self, what: Request) -> None:
        """Decide at once: only for a decision every rank makes alike (e.g. after a vote)."""
        self._requests |= int(what)
        self._set_decisions(self._decisions | int(what))

    def decided(self, what: Request) -> bool:
        return bool(self._effective() & int(what))

    def done_with(self, what: Request) -> None:
        """A one-shot decision (save, preempt) has been acted on."""
        if what & _PREEMPT:
            self._signalled = False
        self._requests &= ~int(what)
        self._set_decisions(self._decisions & ~int(what))

    def _effective(self) -> int:
        """The decisions, with a signal that one process has not folded in yet."""
        return self._decisions | (_PREEMPT if self._single and self._signalled else 0)

    def _set_decisions(self, decisions: int) -> None:
        self._decisions = decisions
        effective = self._effective()
        self.stop_decided = bool(effective & _STOP)
        self.anything_decided = bool(effective & _ONE_SHOT)

    def vote_stop(self, strategy: Any) -> None:
        """A collective: every rank asks whether any rank requested STOP, and decides alike."""
        if not self._single and strategy.reduce_boolean_decision(self.requested(Request.STOP), all=False):
            self.decide(Request.STOP)
