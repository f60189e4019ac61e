"""EarlyStopping as a Lightning user sees it: when it stops, why, what it says, its attributes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _spawn import spawn
from distloop import EarlyStopping, LoopModule, MisconfigurationError, Trainer
from distloop.callbacks import EarlyStoppingReason


class Scripted(LoopModule):
    """Logs ``val_loss`` from a script, one value per validation run (rank 1 reads ``rank_one`` instead)."""

    def __init__(self, values, rank_one=None):
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.values = list(values)
        self.rank_one = list(rank_one or values)
        self.runs = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        values = self.rank_one if self.global_rank == 1 else self.values
        self.log("val_loss", torch.tensor(values[min(self.runs, len(values) - 1)]))

    def on_validation_epoch_end(self):
        self.runs += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n=16):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(stopper, values, max_epochs=10, **kwargs):
    trainer = Trainer(max_epochs=max_epochs, callbacks=[stopper], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      accelerator="cpu", **kwargs)
    trainer.fit(Scripted(values), loader(), loader())
    return trainer


def test_patience_counts_checks_without_improvement(capsys):
    stopper = EarlyStopping("val_loss", patience=2, verbose=True)
    trainer = fit(stopper, [5.0, 4.0, 4.5, 4.2, 1.0])
    assert trainer.current_epoch == 4 and stopper.stopped_epoch == 3 and stopper.wait_count == 2
    assert isinstance(stopper.best_score, torch.Tensor) and stopper.best_score.item() == 4.0
    assert stopper.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    message = ("Monitored metric val_loss did not improve in the last 2 records. Best score: 4.000. "
               "Signaling Trainer to stop.")
    assert stopper.stopping_reason_message == message
    err = capsys.readouterr().err
    assert "Metric val_loss improved. New best score: 5.000" in err
    assert "Metric val_loss improved by 1.000 >= min_delta = 0.0. New best score: 4.000" in err
    assert message in err


def test_min_delta_is_signed_by_mode_and_demands_more_than_it():
    assert EarlyStopping("val_loss", min_delta=0.5).min_delta == -0.5
    assert EarlyStopping("val_acc", min_delta=0.5, mode="max").min_delta == 0.5
    stopper = EarlyStopping("val_loss", min_delta=0.5, patience=1)
    fit(stopper, [5.0, 4.6, 4.0])
    assert stopper.stopped_epoch == 1 and stopper.best_score.item() == 5.0  # 0.4 better is no improvement


def test_stopping_threshold_stops_at_once():
    stopper = EarlyStopping("val_loss", stopping_threshold=1.5)
    fit(stopper, [3.0, 2.0, 1.0, 0.5])
    assert stopper.stopped_epoch == 2 and stopper.stopping_reason is EarlyStoppingReason.STOPPING_THRESHOLD
    assert stopper.stopping_reason_message == \
        "Stopping threshold reached: val_loss = 1.0 < 1.5. Signaling Trainer to stop."


def test_divergence_threshold_stops_at_once():
    stopper = EarlyStopping("val_loss", divergence_threshold=10.0)
    fit(stopper, [1.0, 20.0, 0.5])
    assert stopper.stopped_epoch == 1 and stopper.stopping_reason is EarlyStoppingReason.DIVERGENCE_THRESHOLD
    assert stopper.stopping_reason_message == \
        "Divergence threshold reached: val_loss = 20.0 < 10.0. Signaling Trainer to stop."  # Lightning's wording


def test_a_non_finite_value_stops_unless_check_finite_is_off():
    stopper = EarlyStopping("val_loss", patience=5)
    fit(stopper, [1.0, math.nan, 0.5])
    assert stopper.stopped_epoch == 1 and stopper.stopping_reason is EarlyStoppingReason.NON_FINITE_METRIC
    assert stopper.stopping_reason_message.startswith("Monitored metric val_loss = nan is not finite.")
    tolerant = EarlyStopping("val_loss", patience=5, check_finite=False)
    trainer = fit(tolerant, [1.0, math.nan, 0.5], max_epochs=3)
    assert trainer.current_epoch == 3 and tolerant.stopping_reason is EarlyStoppingReason.NOT_STOPPED
    assert tolerant.best_score.item() == 0.5


def test_a_missing_metric_is_an_error_unless_not_strict():
    with pytest.raises(MisconfigurationError, match="`val_acc` which is not available.*`val_loss`"):
        fit(EarlyStopping("val_acc"), [1.0])
    trainer = fit(EarlyStopping("val_acc", strict=False), [1.0], max_epochs=2)
    assert trainer.current_epoch == 2


def test_it_checks_after_each_validation_when_validating_more_than_once_an_epoch():
    stopper = EarlyStopping("val_loss", patience=1)
    trainer = fit(stopper, [1.0, 1.0, 1.0], val_check_interval=0.5)
    assert stopper._check_on_train_epoch_end is False
    assert stopper.stopped_epoch == 0 and trainer.global_step == 4  # the second validation of epoch 0 stopped it


def test_state_round_trips():
    stopper = EarlyStopping("val_loss", patience=1)
    fit(stopper, [2.0, 3.0])
    restored = EarlyStopping("val_loss", patience=1)
    restored.load_state_dict(stopper.state_dict())
    assert (restored.wait_count, restored.stopped_epoch, restored.best_score.item(), restored.stopping_reason,
            restored.stopping_reason_message) == (1, 1, 2.0, EarlyStoppingReason.PATIENCE_EXHAUSTED,
                                                  stopper.stopping_reason_message)
    assert stopper.state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"


def _one_rank_stops(rank, world_size, out):
    stopper = EarlyStopping("val_loss", patience=1, verbose=True, log_rank_zero_only=True)
    trainer = Trainer(max_epochs=10, callbacks=[stopper], strategy="ddp", accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0)
    trainer.fit(Scripted([3.0, 2.0, 1.0, 0.5], rank_one=[3.0, 3.0]), loader(32), loader(32))
    torch.save({"epoch": trainer.current_epoch, "stopped": stopper.stopped_epoch}, f"{out}-{rank}.pt")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_any_ranks_stop_stops_every_rank(tmp_path, capfd):
    spawn(_one_rank_stops, 2, str(tmp_path / "r"), init=False, timeout=150)
    results = [torch.load(tmp_path / f"r-{rank}.pt", weights_only=True) for rank in range(2)]
    assert results[0] == results[1] == {"epoch": 2, "stopped": 1}  # rank 1 did not improve at epoch 1
    err = capfd.readouterr().err
    assert "[rank: 0] Metric val_loss improved by 1.000" in err and "[rank: 1]" not in err
