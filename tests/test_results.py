import io
import math
from fractions import Fraction

import pytest
import torch
from torchmetrics import MeanMetric

from distloop import MisconfigurationError, ResultCollection
from distloop.results import FLAG_BITS, FOLD_EVERY


def _counting_identity():
    calls = []

    def sync_fn(tensor, reduce_op="mean"):
        calls.append((reduce_op, tensor.dtype, tensor.numel()))
        return tensor.clone()

    return sync_fn, calls


def test_epoch_mean_is_weighted_by_batch_size():
    r = ResultCollection(training=True)
    r.log("training_step", "loss", torch.tensor(1.0), on_step=False, on_epoch=True, batch_size=1)
    r.log("training_step", "loss", torch.tensor(4.0), on_step=False, on_epoch=True, batch_size=3)
    value = r.metrics(on_step=False).log["loss"]
    assert value.item() == pytest.approx((1.0 * 1 + 4.0 * 3) / 4)


def test_integer_values_never_floor():
    r = ResultCollection()
    r.log("validation_step", "correct", torch.tensor(1), batch_size=2)
    r.log("validation_step", "correct", torch.tensor(2), batch_size=2)
    value = r.metrics(on_step=False).log["correct"]
    assert value.is_floating_point() and value.item() == 1.5


def test_float64_keeps_a_float64_accumulator():
    r = ResultCollection()
    r.log("validation_step", "x", torch.tensor(1.0 + 1e-12, dtype=torch.float64))
    r.log("validation_step", "x", torch.tensor(1.0, dtype=torch.float64))
    value = r.metrics(on_step=False).log["x"]
    assert value.dtype == torch.float64 and value.item() == 1.0 + 0.5e-12


@pytest.mark.parametrize("fx, expected", [("max", 3.0), ("min", -2.0), ("sum", 2.0), (torch.max, 3.0)])
def test_reductions(fx, expected):
    r = ResultCollection()
    for v in (1.0, 3.0, -2.0):
        r.log("validation_step", "v", v, reduce_fx=fx)
    assert r.metrics(on_step=False).log["v"].item() == expected


def test_reset_fills_the_reduction_identity():
    r = ResultCollection()
    for name, fx in (("a", "max"), ("b", "min"), ("c", "sum"), ("d", "mean")):
        r.log("validation_step", name, 5.0, reduce_fx=fx)
    r.reset()
    state = r.state_dict()["items"]
    assert state["validation_step.a"]["value"].item() == -math.inf
    assert state["validation_step.b"]["value"].item() == math.inf
    assert state["validation_step.c"]["value"].item() == 0.0
    assert state["validation_step.d"]["value"].item() == 0.0 and state["validation_step.d"]["weight"] == 0
    r.log("validation_step", "a", -7.0, reduce_fx="max")
    assert r.metrics(on_step=False).log["a"].item() == -7.0


def test_step_and_epoch_names_and_consumers():
    r = ResultCollection(training=True)
    r.log("training_step", "loss", torch.tensor(2.0), on_step=True, on_epoch=True, prog_bar=True)
    r.log("training_step", "lr", 0.1, on_step=True, on_epoch=False, logger=False, prog_bar=True)
    r.log("training_step", "acc", 0.5, on_step=False, on_epoch=True)
    step = r.metrics(on_step=True)
    assert set(step.log) == {"loss_step"}
    assert set(step.pbar) == {"loss_step", "lr"}
    assert set(step.callback) == {"loss", "loss_step", "lr"}
    epoch = r.metrics(on_step=False)
    assert set(epoch.log) == {"loss_epoch", "acc"}
    assert set(epoch.callback) == {"loss", "loss_epoch", "acc"}


def test_evaluation_step_values_do_not_reach_callbacks():
    r = ResultCollection(training=False)
    r.log("validation_step", "v", 1.0, on_step=True, on_epoch=True)
    assert r.metrics(on_step=True).callback == {}
    assert set(r.metrics(on_step=True).log) == {"v_step"}


def test_logging_does_not_move_values_to_the_host(monkeypatch):
    r = ResultCollection(training=True)
    r.log("training_step", "loss", torch.tensor(1.0), on_step=True, on_epoch=True, batch_size=8)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync on the logging hot path")

    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "cpu", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    for _ in range(5):
        r.log("training_step", "loss", torch.tensor(1.0), on_step=True, on_epoch=True, batch_size=8)


@pytest.mark.parametrize(
    "kwargs, value, match",
    [
        ({"reduce_fx": "median"}, 1.0, "reduce_fx"),
        ({"on_step": False, "on_epoch": False}, 1.0, "log nothing"),
        ({}, torch.ones(3), "scalar"),
        ({}, "text", "number"),
    ],
)
def test_bad_log_calls_say_what_to_change(kwargs, value, match):
    r = ResultCollection()
    with pytest.raises(MisconfigurationError, match=match):
        r.log("training_step", "x", value, **kwargs)


def test_logging_one_name_with_other_arguments_raises():
    r = ResultCollection()
    r.log("training_step", "x", 1.0, reduce_fx="sum")
    r.log("training_step", "x", 1.0, reduce_fx=torch.sum)  # same meaning: fine
    with pytest.raises(MisconfigurationError, match="different arguments"):
        r.log("training_step", "x", 1.0, reduce_fx="max")


def test_metric_objects_need_an_attribute_name():
    with pytest.raises(MisconfigurationError, match="metric_attribute"):
        ResultCollection().log("validation_step", "m", MeanMetric())


def test_metric_state_survives_a_weights_only_round_trip():
    metric = MeanMetric()
    metric.update(torch.tensor([1.0, 2.0, 3.0]))
    r = ResultCollection()
    r.log("validation_step", "m", metric, metric_attribute="m")
    buf = io.BytesIO()
    torch.save(r.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = MeanMetric()
    restored = ResultCollection()
    restored.load_state_dict(state, metrics={"m": fresh})
    assert fresh.compute().item() == 2.0
    fresh.update(torch.tensor([6.0]))
    assert restored.metrics(on_step=False).log["m"].item() == 3.0
    with pytest.raises(MisconfigurationError, match="no Metric of that name"):
        ResultCollection().load_state_dict(state, metrics={})


def test_sync_of_twenty_metrics_costs_one_collective_per_op_and_dtype_plus_one():
    sync_fn, calls = _counting_identity()
    r = ResultCollection(training=True)
    r.sync_fn = sync_fn
    for i in range(20):
        r.log("training_step", f"m{i}", torch.tensor(float(i)), on_step=True, on_epoch=True, sync_dist=True)
    r.sync()
    assert len(calls) == 2  # key check + one float32 sum buffer (values and weights)
    assert calls[1] == ("sum", torch.float32, 40)
    r.unsync()

    calls.clear()
    r.log("training_step", "peak", 1.0, reduce_fx="max", sync_dist=True)
    r.log("training_step", "wide", torch.tensor(1.0, dtype=torch.float64), sync_dist=True)
    r.metrics(on_step=True)
    assert len(calls) == 2  # only the 20 step values: check + one sum buffer with the world-size slot
    assert calls[1] == ("sum", torch.float32, 21)
    calls.clear()
    r.metrics(on_step=False)
    assert len(calls) == 1 + 3


def test_a_sync_point_whose_keys_were_agreed_before_costs_one_collective_with_the_check_inside():
    sync_fn, calls = _counting_identity()
    r = ResultCollection(training=True)
    r.sync_fn = sync_fn
    for step in range(3):
        for i in range(20):
            r.log("training_step", f"m{i}", torch.tensor(float(i + step)), on_step=True, on_epoch=True,
                  sync_dist=True)
        calls.clear()
        read = r.metrics(on_step=True, flags=0b101)
        assert read.log["m3_step"].item() == 3.0 + step
        assert read.flags == 0b101
        if step == 0:  # key check, then the values
            assert calls == [("max", torch.int64, 2 + FLAG_BITS), ("sum", torch.float32, 21)]
        else:  # the values, with "keys changed" and the flags behind the world-size slot
            assert calls == [("sum", torch.float32, 21 + 1 + FLAG_BITS)]


def test_new_keys_after_an_agreed_layout_cost_the_check_and_the_values_again():
    sync_fn, calls = _counting_identity()
    r = ResultCollection(training=True)
    r.sync_fn = sync_fn
    r.log("training_step", "a", torch.tensor(1.0), on_step=True, sync_dist=True)
    r.metrics(on_step=True)
    r.log("training_step", "peak", torch.tensor(5.0), on_step=True, reduce_fx="max", sync_dist=True)
    calls.clear()
    read = r.metrics(on_step=True, flags=2)
    assert read.log == {"a_step": torch.tensor(1.0), "peak_step": torch.tensor(5.0)}
    assert read.flags == 2
    assert calls == [("sum", torch.float32, 2 + 1 + FLAG_BITS),  # the agreed layout's size: "changed"
                     ("max", torch.int64, 2 + FLAG_BITS), ("sum", torch.float32, 2), ("max", torch.float32, 1)]
    calls.clear()
    r.metrics(on_step=True)
    assert [c[0] for c in calls] == ["sum", "max"]  # agreed again: the header rides in the first buffer


def test_a_min_only_layout_carries_the_header_negated():
    def two_ranks(tensor, reduce_op="mean"):  # ranks alike, but a min of -1 and 0 would be -1: check the sign
        assert reduce_op in ("min", "max")
        if reduce_op == "min":
            return torch.minimum(tensor, torch.zeros_like(tensor))
        return tensor

    r = ResultCollection(training=True)
    r.sync_fn = two_ranks
    r.log("training_step", "low", torch.tensor(-3.0), on_step=True, on_epoch=False, reduce_fx="min", sync_dist=True)
    r.metrics(on_step=True)
    read = r.metrics(on_step=True, flags=1)
    assert read.log["low"].item() == -3.0
    assert read.flags == 1


def test_flags_outside_the_agreed_bits_are_an_error():
    with pytest.raises(ValueError, match="0 <= flags < 256"):
        ResultCollection().metrics(on_step=True, flags=256)


def test_sync_and_unsync_swap_values_and_keep_local_ones():
    def doubling(tensor, reduce_op="mean"):
        return tensor if tensor.dtype == torch.int64 else tensor * 2

    r = ResultCollection()
    r.sync_fn = doubling
    r.log("validation_step", "s", 3.0, reduce_fx="sum", sync_dist=True)
    r.log("validation_step", "local", 3.0, reduce_fx="sum")
    r.sync()
    state = r.state_dict()
    assert state["synced"] is True
    assert state["items"]["validation_step.s"]["value"].item() == 6.0
    assert state["items"]["validation_step.local"]["value"].item() == 3.0
    r.unsync()
    assert r.state_dict()["synced"] is False
    assert r.state_dict()["items"]["validation_step.s"]["value"].item() == 3.0


def test_step_mean_across_ranks_uses_the_world_size_from_the_same_buffer():
    def two_ranks_same_values(tensor, reduce_op="mean"):
        return tensor if tensor.dtype == torch.int64 else tensor * 2

    r = ResultCollection(training=True)
    r.sync_fn = two_ranks_same_values
    r.log("training_step", "loss", torch.tensor(5.0), on_step=True, on_epoch=False, sync_dist=True)
    assert r.metrics(on_step=True).log["loss"].item() == 5.0


def test_clear_forgets_keys():
    r = ResultCollection()
    r.log("validation_step", "x", 1.0)
    r.clear()
    assert len(r) == 0 and r.metrics(on_step=False).log == {}


# ---------------------------------------------------------------- deferred epoch values (try_log)
ARGS = (True, True, "mean", False, False, True, None)  # on_step, on_epoch, reduce_fx, sync_dist, ...


def _fast_logged(values, sizes, reduce_fx="mean"):
    """A collection fed as ``self.log`` feeds it: the first value on the full path, the rest on the fast one."""
    r = ResultCollection(training=True)
    args = (True, True, reduce_fx, False, False, True, None)
    r.log("training_step", "x", values[0], on_step=True, on_epoch=True, reduce_fx=reduce_fx, batch_size=sizes[0])
    for v, n in zip(values[1:], sizes[1:]):
        assert r.try_log("training_step.x", args, v, n)
    return r


def _log_as_self_log_does(r, values, sizes, reduce_fx):
    args = (True, True, reduce_fx, False, False, True, None)
    for v, n in zip(values, sizes):
        if not r.try_log("training_step.x", args, v, n):
            r.log("training_step", "x", v, on_step=True, on_epoch=True, reduce_fx=reduce_fx, batch_size=n)


def _epoch_value(r):
    return r.metrics(on_step=False).log["x_epoch"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", ["unequal", "equal"])
@pytest.mark.parametrize("n", [1, FOLD_EVERY - 1, FOLD_EVERY, FOLD_EVERY + 1, 2 * FOLD_EVERY + 2, 2 * FOLD_EVERY + 5])
@pytest.mark.parametrize("reduce_fx", ["mean", "sum", "max", "min"])
def test_deferred_values_reduce_like_eager_ones_across_folds(reduce_fx, n, sizes, dtype):
    # Odd multiples of 1/8 (none is 0): every weighted sum below is exact, in any order of addition, so a
    # value lost or counted twice while waiting to be folded changes the result, and the result is exact.
    numbers = [(2 * ((37 * i) % 101) - 101) / 8 for i in range(n)]
    if reduce_fx in ("max", "min") and n > 1:
        numbers[-1] = 100.0 if reduce_fx == "max" else -100.0  # the extreme is the last value logged
    if sizes == "equal":
        batch = [4] * n
    else:  # unequal (a weighted fold), the last one making the total a power of two: an exact mean
        batch = [1 + i % 4 for i in range(n)]
        batch[-1] = 2 ** math.ceil(math.log2(sum(batch[:-1]) + 1)) - sum(batch[:-1])
    weighted, weight = sum(Fraction(v) * b for v, b in zip(numbers, batch)), sum(batch)
    expected = {"mean": weighted / weight, "sum": sum(map(Fraction, numbers)),
                "max": max(numbers), "min": min(numbers)}[reduce_fx]
    inexact = reduce_fx == "mean" and sizes == "equal"  # one rounding, in the final division

    def check(value):
        assert value.dtype == dtype
        if inexact:
            assert value.item() == pytest.approx(float(expected), rel=1e-6 if dtype == torch.float32 else 1e-14)
        else:
            assert value.item() == float(expected)

    values = [torch.tensor(v, dtype=dtype) for v in numbers]  # fresh tensors: the ones that wait to be folded
    r = _fast_logged(values, batch, reduce_fx)
    check(_epoch_value(r))

    # A checkpoint in the middle of waiting values, then the rest: exactly the uninterrupted value.
    cut = max(1, n - 2)
    part = _fast_logged(values[:cut], batch[:cut], reduce_fx)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = ResultCollection(training=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    _log_as_self_log_does(resumed, values[cut:], batch[cut:], reduce_fx)
    assert torch.equal(_epoch_value(resumed), _epoch_value(r))

    # After reset nothing of it is left, waiting values included: the identity (no weight: nan for a mean),
    # and the same values logged again give the same epoch value.
    r.reset()
    after = r.metrics(on_step=False).log
    if "x_epoch" in after:
        identity = {"mean": math.nan, "sum": 0.0, "max": -math.inf, "min": math.inf}[reduce_fx]
        assert after["x_epoch"].item() == identity or math.isnan(identity) and after["x_epoch"].isnan()
    _log_as_self_log_does(r, [v.clone() for v in values], batch, reduce_fx)
    check(_epoch_value(r))
    if not inexact:
        assert torch.equal(_epoch_value(r), _epoch_value(resumed))


def test_reading_does_not_fold_so_the_sum_depends_only_on_the_values():
    values = [torch.tensor(0.1 * i) for i in range(100)]
    reads = _fast_logged(values[:50], [2] * 50)
    reads.metrics(on_step=False)
    reads.state_dict()
    for v in values[50:]:
        reads.try_log("training_step.x", ARGS, v, 2)
    quiet = _fast_logged(values, [2] * 100)
    assert torch.equal(reads.metrics(on_step=False).log["x_epoch"], quiet.metrics(on_step=False).log["x_epoch"])


def test_waiting_values_survive_a_checkpoint_round_trip_exactly():
    values = [torch.tensor(1.0 / (i + 3)) for i in range(90)]
    full = _fast_logged(values, [3] * 90)
    part = _fast_logged(values[:70], [3] * 70)
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    resumed = ResultCollection(training=True)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for v in values[70:]:
        assert resumed.try_log("training_step.x", ARGS, v, 3)
    assert torch.equal(resumed.metrics(on_step=False).log["x_epoch"], full.metrics(on_step=False).log["x_epoch"])


def test_a_value_changed_in_place_after_logging_is_a_clear_error():
    r = _fast_logged([torch.tensor(1.0), torch.tensor(2.0)], [1, 1])
    changed = torch.tensor(3.0)
    r.try_log("training_step.x", ARGS, changed, 1)
    changed.mul_(10)
    with pytest.raises(MisconfigurationError, match=r"`x` was changed in place after `self.log`.*clone\(\)"):
        r.metrics(on_step=False)


@pytest.mark.parametrize("kind", ["same tensor", "parameter", "view of a large tensor", "changed before"])
def test_values_that_may_change_or_hold_memory_are_folded_in_at_once(kind):
    big = torch.arange(1000.0)
    same, parameter = torch.tensor(5.0), torch.nn.Parameter(torch.tensor(5.0))
    make = {"same tensor": lambda: same, "parameter": lambda: parameter,  # one object, logged again
            "view of a large tensor": lambda: big[5],  # a new view each time
            "changed before": lambda: torch.tensor(2.0).add_(3.0)}[kind]  # a new tensor each time
    r = ResultCollection(training=True)
    logged = []
    for _ in range(3):  # as ``self.log`` does: the fast path, else the full one
        value = make()
        logged.append(value)
        if not r.try_log("training_step.x", ARGS, value, 1):
            r.log("training_step", "x", value, on_step=True, on_epoch=True, batch_size=1)
    with torch.no_grad():
        for value in [big] if kind == "view of a large tensor" else {id(v): v for v in logged}.values():
            value.add_(100.0)
    # Folded in when logged: reading now, and a checkpoint taken now, give the value as it was logged
    # (not 105, and no "changed in place" error), and the checkpoint holds no copy of the large tensor.
    assert r.metrics(on_step=False).log["x_epoch"].item() == 5.0
    buf = io.BytesIO()
    torch.save(r.state_dict(), buf)
    assert buf.tell() < big.numel() * big.element_size()
    buf.seek(0)
    restored = ResultCollection(training=True)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.metrics(on_step=False).log["x_epoch"].item() == 5.0
