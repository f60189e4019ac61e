"""The control plane (distloop/control.py): requests, agreed decisions, signals."""

import os
import signal

from distloop.control import Control, Request


class Votes:
    """A strategy stand-in whose other ranks vote as told."""

    def __init__(self, others: bool) -> None:
        self.others = others
        self.calls = 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls += 1
        return decision or self.others


def started(world_size: int) -> Control:
    control = Control()
    control.start(world_size=world_size, catch_signals=False)
    return control


def test_with_one_process_a_request_is_a_decision():
    control = started(1)
    control.request(Request.STOP)
    assert control.decided(Request.STOP) and control.stop_decided
    control.withdraw(Request.STOP)
    assert not control.stop_decided


def test_with_several_ranks_a_request_waits_for_the_agreement():
    control = started(2)
    control.request(Request.SAVE)
    assert control.pending == Request.SAVE and not control.anything_decided
    control.agree(int(Request.SAVE | Request.PREEMPT))  # another rank was preempted
    assert control.decided(Request.SAVE) and control.decided(Request.PREEMPT) and control.anything_decided
    assert control.pending == 0  # answered: a one-shot request is not sent again
    control.done_with(Request.SAVE)
    control.done_with(Request.PREEMPT)
    assert not control.anything_decided


def test_a_stop_request_stays_until_the_run_ends():
    control = started(2)
    control.request(Request.STOP)
    control.agree(int(Request.STOP))
    assert control.pending == Request.STOP and control.stop_decided
    control.start(world_size=2, catch_signals=False)
    assert control.pending == 0 and not control.stop_decided


def test_the_epoch_end_vote_decides_alike_for_every_rank():
    control = started(2)
    votes = Votes(others=True)
    control.vote_stop(votes)
    assert control.stop_decided and votes.calls == 1
    quiet = started(2)
    quiet.vote_stop(Votes(others=False))
    assert not quiet.stop_decided
    alone = started(1)
    no_collective = Votes(others=True)
    alone.vote_stop(no_collective)
    assert no_collective.calls == 0 and not alone.stop_decided


def test_sigterm_and_sigusr1_request_a_preemption_and_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    control = Control()
    control.start(world_size=1, catch_signals=True)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert control.requested(Request.PREEMPT) and control.decided(Request.PREEMPT)
    control.finish()
    assert signal.getsignal(signal.SIGUSR1) is before
