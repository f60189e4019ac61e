"""ModelSummary: Lightning's layer table, from ``summarize`` and printed by the callback at the start of fit."""

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distloop import LoopModule, MisconfigurationError, Trainer
from distloop.callbacks import ModelSummary, RichModelSummary, summarize
from distloop.callbacks.model_summary import human_count


class Lit(LoopModule):
    """The module of Lightning's ModelSummary docstring."""

    def __init__(self, example=True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512))
        if example:
            self.example_input_array = torch.zeros(10, 256)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return self(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


LIGHTNING_DEPTH_1 = """\
  | Name | Type       | Params | Mode  | FLOPs | In sizes  | Out sizes
----------------------------------------------------------------------------
0 | net  | Sequential | 132 K  | train | 2.6 M | [10, 256] | [10, 512]
----------------------------------------------------------------------------
132 K     Trainable params
0         Non-trainable params
132 K     Total params
0.530     Total estimated model params size (MB)
3         Modules in train mode
0         Modules in eval mode
2.6 M     Total Flops"""

LIGHTNING_ALL = """\
  | Name  | Type        | Params | Mode  | FLOPs | In sizes  | Out sizes
------------------------------------------------------------------------------
0 | net   | Sequential  | 132 K  | train | 2.6 M | [10, 256] | [10, 512]
1 | net.0 | Linear      | 131 K  | train | 2.6 M | [10, 256] | [10, 512]
2 | net.1 | BatchNorm1d | 1.0 K  | train | 0     | [10, 512] | [10, 512]
------------------------------------------------------------------------------"""


def test_the_table_is_lightnings():
    module = Lit()
    assert str(summarize(module, max_depth=1)) == LIGHTNING_DEPTH_1
    assert str(summarize(module, max_depth=-1)).startswith(LIGHTNING_ALL)
    assert module.training  # the example forward ran in eval mode and put the modes back


def test_frozen_eval_and_loose_parameters_are_counted():
    module = Lit(example=False)
    module.net[1].requires_grad_(False)
    module.net[1].eval()
    module.scale = nn.Parameter(torch.ones(3))
    summary = summarize(module)
    assert (summary.total_parameters, summary.trainable_parameters) == (256 * 512 + 512 + 1024 + 3, 256 * 512 + 512 + 3)
    assert summary.training_modes == {"train": 2, "eval": 1}
    text = str(summary)
    assert "  | other params | n/a        | 3      | n/a   | n/a" in text
    assert "In sizes" not in text and "1.0 K     Non-trainable params" in text and "0         Total Flops" in text


@pytest.mark.parametrize(("number", "text"), [(0, "0  "), (123, "123  "), (1234, "1.2 K"), (2e6, "2.0 M"),
                                              (3e9, "3.0 B"), (4e14, "400 T"), (5e15, "5,000 T")])
def test_counts_read_as_lightnings(number, text):
    assert human_count(number) == text


def fit_with(callbacks, capsys):
    data = DataLoader(TensorDataset(torch.randn(8, 256)), batch_size=4)
    trainer = Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, accelerator="cpu")
    trainer.fit(Lit(example=False), data)
    return capsys.readouterr().err


def test_the_callback_prints_the_table_when_fit_starts(capsys):
    err = fit_with([ModelSummary(max_depth=2)], capsys)
    assert "1 | net.0 | Linear      | 131 K  | train | 0" in err
    assert "132 K     Total params" in err and "0.530     Total estimated model params size (MB)" in err
    assert "| Name" not in fit_with([ModelSummary(max_depth=0)], capsys)


def test_a_bad_depth_says_what_to_use():
    with pytest.raises(MisconfigurationError, match="-1 .all., 0 .none. or a depth > 0"):
        ModelSummary(max_depth=-2)
    with pytest.raises(MisconfigurationError):
        summarize(Lit(), max_depth=1.5)


def test_the_rich_summary_is_the_same_summary_as_a_table(capsys):
    pytest.importorskip("rich")
    err = fit_with([RichModelSummary(max_depth=2)], capsys)
    rows = [[cell.strip() for cell in line.strip("│┃ ").split("│")] for line in err.splitlines() if "net.0" in line]
    assert rows == [["1", "net.0", "Linear", "131 K", "train", "0"]]
    for total in ("Trainable params: 132 K", "Non-trainable params: 0", "Total params: 132 K",
                  "Total estimated model params size (MB): 0.530", "Modules in train mode: 3",
                  "Modules in eval mode: 0", "Total FLOPs: 0"):
        assert total in err
    assert "Name" not in fit_with([RichModelSummary(max_depth=0)], capsys)


def test_a_subclass_prints_the_summary_its_own_way(capsys):
    class Short(ModelSummary):
        @staticmethod
        def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                      total_flops, **summarize_kwargs):
            print(f"{total_parameters} params, {summarize_kwargs}", file=sys.stderr)

    assert fit_with([Short(unit="params")], capsys) == f"{256 * 512 + 512 + 1024} params, {{'unit': 'params'}}\n"


def test_without_rich_the_rich_summary_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(MisconfigurationError, match=r"RichModelSummary needs the `rich` package.*distloop\[rich\]"):
        RichModelSummary()
