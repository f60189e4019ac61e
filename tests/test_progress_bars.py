"""The progress bars: TQDMProgressBar and RichProgressBar on a terminal and off one, on rank zero only,
copied mid-fit, stopped cleanly by an error, and the Trainer's default (Lightning's rule)."""

import copy
import io
import pickle
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import LoopModule, MisconfigurationError, Trainer
from distloop.callbacks import (Callback, ModelSummary, ProgressBar, RichModelSummary, RichProgressBar,
                                TQDMProgressBar)


class Terminal(io.StringIO):
    """What a bar takes for a terminal."""

    def isatty(self):
        return True


class Tiny(LoopModule):
    def __init__(self, fail_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom")
        loss = F.mse_loss(self.layer(batch[0]), batch[1])
        self.log("loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(batches=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * 4, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(bar, epochs=2, module=None, **kwargs):
    trainer = Trainer(max_epochs=epochs, logger=False, accelerator="cpu", enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[bar], log_every_n_steps=1, **kwargs)
    trainer.fit(module or Tiny(), data(), data(2))
    return trainer


def tqdm_bar(stream, **kwargs):
    return TQDMProgressBar(stream=stream, **kwargs)


def rich_bar(stream, **kwargs):
    terminal = {"force_terminal": True, "width": 120} if isinstance(stream, Terminal) else {}
    return RichProgressBar(console_kwargs={"file": stream, **terminal}, **kwargs)


BARS = pytest.mark.parametrize("make", [tqdm_bar, rich_bar], ids=["tqdm", "rich"])
EPOCH_LINE = re.compile(r"Epoch (\d+): (\d+) batches in [\d.]+s \([\d.]+ batch/s\) loss=([\d.]+)$")


def epoch_lines(text):
    """(epoch, batches, loss) of each line, or a failure naming the line that is not an epoch's."""
    matches = [(EPOCH_LINE.match(line), line) for line in text.splitlines()]
    assert all(m for m, _ in matches), [line for m, line in matches if not m]
    return [(int(m[1]), int(m[2]), float(m[3])) for m, _ in matches]


@BARS
def test_off_a_terminal_a_bar_prints_one_line_per_epoch(make):
    stream = io.StringIO()
    trainer = fit(make(stream))
    lines = epoch_lines(stream.getvalue())
    assert [(epoch, batches) for epoch, batches, _ in lines] == [(0, 8), (1, 8)]
    assert lines[-1][2] == pytest.approx(trainer.progress_bar_metrics["loss"], rel=1e-3)


@pytest.mark.parametrize(("make", "shown"), [(tqdm_bar, "loss={:.4g}"), (rich_bar, "loss: {:.3f}")],
                         ids=["tqdm", "rich"])
def test_on_a_terminal_a_bar_shows_epoch_batches_and_metrics(make, shown):
    stream = Terminal()
    trainer = fit(make(stream))
    out = stream.getvalue()
    assert "Epoch 1" in out and "8/8" in out and "it/s" in out
    assert shown.format(trainer.progress_bar_metrics["loss"]) in out
    assert "batches in" not in out  # a drawn bar, not the lines


@BARS
def test_validate_on_a_terminal_shows_its_bar(make):
    stream = Terminal()
    Trainer(logger=False, accelerator="cpu", callbacks=[make(stream)]).validate(Tiny(), data(2))
    out = stream.getvalue()
    assert "Validation" in out and "2/2" in out


@BARS
@pytest.mark.parametrize("stream_type", [io.StringIO, Terminal])
def test_refresh_rate_0_shows_nothing(make, stream_type):
    stream = stream_type()
    fit(make(stream, refresh_rate=0))
    assert stream.getvalue() == ""


class CopyMidFit(Callback):
    def __init__(self):
        self.copies = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 3:
            bar = trainer.progress_bar_callback
            self.copies = [copy.deepcopy(bar), pickle.loads(pickle.dumps(bar))]


@BARS
def test_a_bar_copies_and_pickles_mid_fit(make):
    stream = Terminal()
    copier = CopyMidFit()
    bar = make(stream)
    trainer = Trainer(max_epochs=1, logger=False, accelerator="cpu", enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[bar, copier])
    trainer.fit(Tiny(), data())
    deep, pickled = copier.copies
    assert deep.stream is stream and isinstance(pickled.stream, Terminal)
    assert "8/8" in stream.getvalue()  # the original went on drawing
    again = Terminal()
    deep._stream = again
    fit(deep, epochs=1)  # a copy made mid-fit runs a fit of its own
    assert "Epoch 0" in again.getvalue() and "8/8" in again.getvalue()


@BARS
def test_an_error_stops_the_bar_and_gives_the_terminal_back(make):
    stream = Terminal()
    bar = make(stream)
    out, err = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="boom"):
        fit(bar, module=Tiny(fail_at=3))
    assert (sys.stdout, sys.stderr) == (out, err)  # rich's display redirects them while it runs
    stream.truncate(0)
    fit(bar, epochs=1)
    assert "8/8" in stream.getvalue()


def _two_ranks(rank, world_size, root):
    for name, make in (("tqdm", tqdm_bar), ("rich", rich_bar)):
        with open(f"{root}/{name}-{rank}.txt", "w") as stream:
            fit(make(stream), strategy="ddp", num_sanity_val_steps=0)


@pytest.mark.distributed
def test_only_rank_zero_shows_a_bar(tmp_path):
    spawn(_two_ranks, 2, str(tmp_path), timeout=120)
    for name in ("tqdm", "rich"):
        lines = epoch_lines((tmp_path / f"{name}-0.txt").read_text())
        assert [(epoch, batches) for epoch, batches, _ in lines] == [(0, 4), (1, 4)]  # 8 batches over 2 ranks
        assert (tmp_path / f"{name}-1.txt").read_text() == ""


def _defaults(**kwargs):
    callbacks = Trainer(logger=False, accelerator="cpu", **kwargs).callbacks
    return ([type(cb) for cb in callbacks if isinstance(cb, ProgressBar)],
            [type(cb) for cb in callbacks if isinstance(cb, ModelSummary)])


def test_the_defaults_are_rich_where_rich_is_installed(monkeypatch):
    pytest.importorskip("rich")
    assert _defaults() == ([RichProgressBar], [RichModelSummary])
    assert _defaults(callbacks=[TQDMProgressBar()]) == ([TQDMProgressBar], [RichModelSummary])
    monkeypatch.setitem(sys.modules, "rich", None)
    assert _defaults() == ([TQDMProgressBar], [ModelSummary])


def test_without_rich_the_rich_bar_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(MisconfigurationError, match=r"RichProgressBar needs the `rich` package.*distloop\[rich\]"):
        RichProgressBar()
