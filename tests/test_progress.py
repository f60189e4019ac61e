import io

import pytest
import torch

from distloop.progress import (
    BatchProgress,
    OptimizationProgress,
    ProcessedTracker,
    Progress,
    ReadyCompletedTracker,
    StartedTracker,
)


def test_increments_move_total_and_current_together():
    p = Progress()
    p.increment_ready()
    p.increment_started()
    p.increment_processed()
    p.increment_completed()
    p.increment_ready()
    assert p.total == ProcessedTracker(ready=2, started=1, processed=1, completed=1)
    assert p.current == p.total
    p.reset_on_run()
    assert p.current == ProcessedTracker()
    assert p.total.ready == 2


def test_missing_counters_raise():
    p = Progress.from_defaults(ReadyCompletedTracker)
    with pytest.raises(TypeError, match="started"):
        p.increment_started()
    with pytest.raises(TypeError, match="processed"):
        Progress.from_defaults(StartedTracker).increment_processed()
    with pytest.raises(TypeError):
        Progress(total=ReadyCompletedTracker(), current=ProcessedTracker())


def test_reset_on_restart_rolls_current_back_to_completed():
    p = Progress.from_defaults(ProcessedTracker, ready=5, started=5, processed=4, completed=3)
    p.reset_on_restart()
    assert p.current == ProcessedTracker(ready=3, started=3, processed=3, completed=3)
    assert p.total == ProcessedTracker(ready=5, started=5, processed=4, completed=3)


def test_batch_progress_round_trip_through_weights_only_load():
    p = BatchProgress()
    for _ in range(3):
        p.increment_ready()
        p.increment_completed()
    p.is_last_batch = True
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    loaded = BatchProgress.from_state_dict(torch.load(buf, weights_only=True))
    assert loaded == p
    assert loaded.is_last_batch is True
    loaded.reset_on_run()
    assert loaded.is_last_batch is False and loaded.current.ready == 0 and loaded.total.ready == 3


def test_optimization_progress_counts_steps():
    p = OptimizationProgress()
    for _ in range(4):
        p.optimizer.step.increment_ready()
        p.optimizer.step.increment_completed()
        p.optimizer.zero_grad.increment_started()
    assert p.optimizer_steps == 4
    state = p.state_dict()
    assert state["optimizer"]["step"]["total"] == {"ready": 4, "completed": 4}
    restored = OptimizationProgress.from_state_dict(state)
    assert restored.optimizer_steps == 4
    assert restored.optimizer.zero_grad.total.started == 4


def test_load_ignores_unknown_and_keeps_missing_keys():
    p = StartedTracker(ready=1, started=1, completed=0)
    p.load_state_dict({"ready": 7, "future_counter": 3})
    assert p == StartedTracker(ready=7, started=1, completed=0)
