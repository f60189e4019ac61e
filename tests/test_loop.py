import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import distloop
from distloop import Loop, MisconfigurationError, ResultCollection
from distloop.progress import BatchProgress, Progress


class Recorder(Loop):
    def __init__(self, n: int = 3, log=None) -> None:
        super().__init__()
        self.n = n
        self.i = 0
        self.log = log if log is not None else []

    @property
    def done(self) -> bool:
        return self.i >= self.n

    def reset(self) -> None:
        self.log.append("reset")
        self.i = 0

    def on_run_start(self, *args, **kwargs) -> None:
        self.log.append(("on_run_start", args, kwargs))

    def on_advance_start(self, *args, **kwargs) -> None:
        self.log.append("on_advance_start")

    def advance(self, *args, **kwargs) -> None:
        self.log.append(("advance", self.i))
        self.i += 1

    def on_advance_end(self) -> None:
        self.log.append("on_advance_end")

    def on_run_end(self):
        self.log.append("on_run_end")
        return "result"


def test_run_hook_order():
    loop = Recorder(n=2)
    assert loop.run(1, k=2) == "result"
    assert loop.log == [
        "reset",
        ("on_run_start", (1,), {"k": 2}),
        "on_advance_start", ("advance", 0), "on_advance_end",
        "on_advance_start", ("advance", 1), "on_advance_end",
        "on_run_end",
    ]


def test_skip_returns_on_skip_without_running():
    class Skipping(Recorder):
        skip = True

        def on_skip(self):
            return "skipped"

    loop = Skipping()
    assert loop.run() == "skipped"
    assert loop.log == []
    assert Recorder().on_skip() is None


@pytest.mark.parametrize("hook", ["on_advance_start", "advance", "on_advance_end"])
def test_stop_iteration_from_any_advance_hook_ends_the_run(hook):
    class Stopping(Recorder):
        pass

    def stop(self, *args, **kwargs):
        if self.i >= 1:
            raise StopIteration
        return getattr(Recorder, hook)(self, *args, **kwargs)

    setattr(Stopping, hook, stop)
    loop = Stopping(n=10)
    loop.restarting = True
    assert loop.run() == "result"
    assert loop.log[-1] == "on_run_end"
    assert loop.i < 10
    assert loop.restarting is False


def test_restarting_is_cleared_after_an_advance():
    seen = []

    class Watch(Recorder):
        def advance(self, *args, **kwargs):
            seen.append(self.restarting)
            super().advance()

    loop = Watch(n=2)
    loop.restarting = True
    loop.run()
    assert seen == [True, False]


def test_restarting_is_cleared_when_run_has_no_advance():
    loop = Recorder(n=0)
    loop.restarting = True
    loop.run()
    assert loop.restarting is False


class Leaf(Recorder):
    pass


class Middle(Recorder):
    def __init__(self, n: int = 3, log=None) -> None:
        super().__init__(n, log)
        self.leaf = Leaf()
        self.progress = BatchProgress()
        self.results = ResultCollection(training=True)

    def connect(self, leaf=None) -> None:
        if leaf is not None:
            self.leaf = leaf


class Top(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.middle = Middle()
        self.epoch_progress = Progress()

    def connect(self, middle=None) -> None:
        if middle is not None:
            self.middle = middle


def _trainer(module=None, global_zero=True):
    return SimpleNamespace(metrics_sync_fn=None, module=module, is_global_zero=global_zero, world_size=1)


def test_trainer_unattached_raises_and_propagates_three_levels():
    top = Top()
    with pytest.raises(RuntimeError, match="not attached to a Trainer"):
        top.middle.leaf.trainer
    trainer = _trainer()
    top.trainer = trainer
    assert top.trainer is trainer and top.middle.trainer is trainer and top.middle.leaf.trainer is trainer


def test_restarting_propagates_three_levels():
    top = Top()
    top.restarting = True
    assert top.middle.restarting and top.middle.leaf.restarting
    top.middle.restarting = False
    assert top.restarting and not top.middle.leaf.restarting


def test_replace_with_an_instance():
    top = Top()
    top.trainer = _trainer()
    old_leaf = top.middle.leaf
    top.middle.replace(leaf=Leaf(n=7))
    assert top.middle.leaf is not old_leaf and top.middle.leaf.n == 7
    assert top.middle.leaf.trainer is top.trainer


def test_replace_with_a_class_copies_init_arguments_and_children():
    class MyMiddle(Middle):
        def advance(self, *args, **kwargs):
            self.i += 2

    top = Top()
    top.trainer = _trainer()
    top.middle.n = 5
    old_leaf = top.middle.leaf
    top.replace(middle=MyMiddle)
    assert type(top.middle) is MyMiddle
    assert top.middle.n == 5
    assert top.middle.leaf is old_leaf
    assert top.middle.trainer is top.trainer and top.middle.leaf.trainer is top.trainer
    top.middle.run()
    assert top.middle.i == 6


def test_replace_with_a_class_of_another_signature_raises():
    class Other(Middle):
        def __init__(self, n: int, extra: int, log=None) -> None:
            super().__init__(n, log)

    top = Top()
    with pytest.raises(MisconfigurationError, match="same parameters"):
        top.replace(middle=Other)
    assert isinstance(distloop.MisconfigurationError("x"), ValueError)


def _three_level_tree():
    top = Top()
    top.on_save_checkpoint = lambda: {"top": 1}
    top.epoch_progress.increment_ready()
    top.epoch_progress.increment_completed()
    top.middle.progress.increment_ready()
    top.middle.progress.increment_started()
    top.middle.progress.increment_processed()
    top.middle.results.log("training_step", "loss", torch.tensor(2.0), batch_size=4)
    return top


def test_state_dict_keys_of_a_three_level_tree():
    top = _three_level_tree()
    top.trainer = _trainer()
    state = top.state_dict()
    assert set(state) == {
        "state_dict",
        "epoch_progress",
        "middle.state_dict",
        "middle.progress",
        "middle.results",
        "middle.leaf.state_dict",
    }
    assert state["state_dict"] == {"top": 1}
    assert state["middle.results"]["synced"] is True
    prefixed = top.middle.state_dict(prefix="fit.")
    assert "fit.leaf.state_dict" in prefixed


def test_round_trip_through_weights_only_load_restores_counters_and_restarting():
    src = _three_level_tree()
    src.trainer = _trainer()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    loaded_extra = []
    dst = Top()
    dst.on_load_checkpoint = loaded_extra.append
    dst.trainer = _trainer()
    dst.load_state_dict(state)
    assert loaded_extra == [{"top": 1}]
    assert dst.epoch_progress == src.epoch_progress
    assert dst.middle.progress == src.middle.progress
    assert dst.restarting and dst.middle.restarting and dst.middle.leaf.restarting
    epoch = dst.middle.results.metrics(on_step=False).callback
    assert epoch["loss"] == torch.tensor(2.0)
    dst.middle.progress.reset_on_restart()
    assert dst.middle.progress.current.started == 0 and dst.middle.progress.total.processed == 1


def test_load_skips_missing_keys_for_older_checkpoints():
    dst = Top()
    dst.trainer = _trainer()
    dst.load_state_dict({"epoch_progress": Progress.from_defaults(type(Progress().total), ready=2).state_dict()})
    assert dst.epoch_progress.total.ready == 2
    assert dst.middle.progress.total.ready == 0
    assert dst.middle.restarting


def test_non_zero_rank_resets_loaded_results():
    src = _three_level_tree()
    src.trainer = _trainer()
    state = src.state_dict()
    dst = Top()
    dst.trainer = _trainer(global_zero=False)
    dst.load_state_dict(state)
    assert dst.middle.results.keys() == ["training_step.loss"]
    value = dst.middle.results.metrics(on_step=False).callback["loss"]
    assert torch.isnan(value)  # identity: nothing of rank zero's totals counted here


def test_unsynced_state_is_refused_by_a_multi_rank_run():
    src = _three_level_tree()
    state = {"middle.results": src.middle.results.state_dict()}
    assert state["middle.results"]["synced"] is False
    dst = Top()
    trainer = _trainer()
    trainer.world_size = 2
    dst.trainer = trainer
    with pytest.raises(RuntimeError, match="without syncing"):
        dst.load_state_dict(state)


def test_metric_objects_are_reattached_from_the_module_on_load():
    from torchmetrics import SumMetric

    class Module(nn.Module):
        def __init__(self):
            super().__init__()
            self.total = SumMetric()

    src_module = Module()
    src = Top()
    src.trainer = _trainer(src_module)
    src_module.total.update(torch.tensor([1.0, 2.0]))
    src.middle.results.log("training_step", "total", src_module.total, metric_attribute="total")
    state = src.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["middle.results"]["items"]["training_step.total"]["metric_state"].values() if not isinstance(v, int))

    dst_module = Module()
    dst = Top()
    dst.trainer = _trainer(dst_module)
    dst.load_state_dict(state)
    assert dst_module.total.compute() == 3.0
    assert dst.middle.results.metrics(on_step=False).log["total"] == 3.0


# ------------------------------------------------------------ contract pieces the loop cookbook needed
def test_prepare_dataloader_gives_a_loop_s_own_loader_the_resumable_sampler(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from distloop import Trainer
    from distloop.data import ResumableSampler, set_epoch

    trainer = Trainer(default_root_dir=tmp_path, seed=1)
    loader = trainer.prepare_dataloader(DataLoader(TensorDataset(torch.arange(8)), batch_size=2, shuffle=True))
    assert isinstance(loader.sampler, ResumableSampler)
    set_epoch(loader, 0)
    whole = [int(i) for (batch,) in loader for i in batch]
    set_epoch(loader, 0, 4)  # resumed 4 samples into the epoch: the rest of the same order
    assert [int(i) for (batch,) in loader for i in batch] == whole[4:] and sorted(whole) == list(range(8))


def test_ddp_find_unused_parameters_true_is_lightning_s_name_for_it():
    from distloop.strategies import DDPStrategy, resolve_strategy

    strategy = resolve_strategy("ddp_find_unused_parameters_true", "cpu", "auto", "32")
    assert isinstance(strategy, DDPStrategy) and strategy.find_unused_parameters
    assert not resolve_strategy("ddp", "cpu", "auto", "32").find_unused_parameters
