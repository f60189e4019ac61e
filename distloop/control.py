"""The control plane: requests to stop, preempt or save, and the decisions every rank agrees on.

Any rank may make a *request*: a callback sets ``trainer.should_stop``, SIGTERM or SIGUSR1
arrives (a preemption notice), a callback's clock says a timed save is due. Acting on a
request where only some ranks made it would leave the others waiting in a collective, so
the loops act only on *decisions*: the OR of every rank's requests, agreed at the next
metrics read (the request bits ride inside that read's buffers: no collective of their
own, see docs/metric-sync.md) or, at epoch end, by a vote. With one process a request is
already a decision.

A stop decision holds until the run ends; save and preemption decisions are used once,
at the next point the run can be resumed from exactly (``Trainer.at_resumable_point``).
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: SLURM's warning before the end of a job
_ONE_SHOT = int(Request.PREEMPT | Request.SAVE)  # plain ints inside: IntFlag arithmetic is slow per step
_STOP = int(Request.STOP)


class Control:
    """This rank's requests and the agreed decisions, for one run."""

    def __init__(self) -> None:
        self._requests = 0
        self._decisions = 0
        self._single = True
        self._previous_handlers: dict[int, Any] = {}
        # Read at every step, so plain attributes, kept in step with the decisions by _decide_bits.
        self.stop_decided = False  # decided(Request.STOP)
        self.anything_decided = False  # a save or preemption decision for the next resumable point

    def start(self, world_size: int, catch_signals: bool) -> None:
        """Forget the last run's requests; with ``catch_signals``, turn SIGTERM / SIGUSR1 into PREEMPT."""
        self._requests = 0
        self._set_decisions(0)
        self._single = world_size == 1
        if catch_signals and threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def finish(self) -> None:
        """Give the signals back to whoever handled them before ``start``."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.request(Request.PREEMPT)

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
        return bool(self._requests & int(what))

    @property
    def pending(self) -> int:
        """The request bits this rank sends with the next metrics read."""
        return self._requests

    # ------------------------------------------------------------ decisions
    def agree(self, agreed: int) -> None:
        """Record what a metrics read agreed on (the OR of every rank's ``pending``)."""
        self._set_decisions(self._decisions | agreed)
        self._requests &= ~(agreed & _ONE_SHOT)  # answered: not sent again

    def decide(self, what: Request) -> None:
        """Decide at once: only for a decision every rank makes alike (e.g. after a vote)."""
        self._requests |= int(what)
        self._set_decisions(self._decisions | int(what))

    def decided(self, what: Request) -> bool:
        return bool(self._decisions & int(what))


    def done_with(self, what: Request) -> None:
        """A one-shot decision (save, preempt) has been acted on."""
        self._set_decisions(self._decisions & ~int(what))
        self._requests &= ~int(what)

    def _set_decisions(self, decisions: int) -> None:
        self._decisions = decisions
        self.stop_decided = bool(decisions & _STOP)
        self.anything_decided = bool(decisions & _ONE_SHOT)

    def vote_stop(self, strategy: Any) -> None:
        """A collective: every rank asks whether any rank requested STOP, and decides alike."""
        if not self._single and strategy.reduce_boolean_decision(self.requested(Request.STOP), all=False):
            self.decide(Request.STOP)
