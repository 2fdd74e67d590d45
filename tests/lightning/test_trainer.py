"""What is read off a Trainer: the budget in each optimizer's own steps, and in global steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from lightning_sdm import SphericalDynamicsCallback
from lightning_sdm.lightning._trainer import budget_of, optimizer_budget, stepping_optimizers
from tests.helpers import BNNet, loader, noisy_classification_data, trainer


class Gan(BNNet):
    """Manual optimization, two networks, each optimizer steps once per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.other = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        for optimizer, net in zip(self.optimizers(), (self.net, self.other)):
            optimizer.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(net(x), y))
            optimizer.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
            torch.optim.SGD(self.other.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
        )


def _fit(tmp_path, **limits):
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], **limits)
    run.fit(Gan(), loader(noisy_classification_data(samples=128)))  # 4 batches per epoch
    return callback, run


def test_each_optimizer_of_a_gan_has_its_own_budget(tmp_path):
    callback, run = _fit(tmp_path, max_epochs=10)
    assert run.global_step == 80  # two optimizer steps per batch, 40 batches
    assert stepping_optimizers(run) == 2
    assert optimizer_budget(run) == 40 and budget_of(run) == 80
    assert callback.advice is not None and callback.advice.total_steps == 40
    text = callback.advice.table()
    assert "40 steps" in text or "1-40" in text.replace(",", "") or "-40 " in text
    assert "20.0 epochs" not in text  # the old reading: global steps taken as one optimizer's


def test_max_steps_counts_global_steps(tmp_path):
    callback, run = _fit(tmp_path, max_epochs=10, max_steps=60)
    assert run.global_step == 60
    assert optimizer_budget(run) == 30 and budget_of(run) == 60
    assert callback.advice is not None and callback.advice.total_steps == 30


def test_one_optimizer_is_unchanged(tmp_path):
    callback = SphericalDynamicsCallback(every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=3)
    run.fit(BNNet(), loader(noisy_classification_data(samples=128)))
    assert stepping_optimizers(run) == 1
    assert optimizer_budget(run) == budget_of(run) == run.global_step == 12


class MuonQKNorm(pl.LightningModule):
    """Muon on a q projection under per-head QK-norm, AdamW on the rest, stepped by hand.

    Today's LLM recipe in Lightning: automatic optimization takes one optimizer, so both step
    in ``training_step`` on one loss, each with its own per-step scheduler.
    """

    def __init__(self, muon_first: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.muon_first = muon_first
        self.q = torch.nn.Linear(16, 16, bias=False)  # 2 heads of 8 rows
        self.gain = torch.nn.Parameter(torch.ones(8))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.q(x).view(-1, 2, 8).to(torch.float32)  # HF's RMSNorm, per head
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.head((self.gain * h).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.manual_backward(torch.nn.functional.cross_entropy(self(x), y))
        for optimizer in self.optimizers():
            optimizer.step()
            optimizer.zero_grad()
        for scheduler in self.lr_schedulers():
            scheduler.step()

    def configure_optimizers(self):
        muon = torch.optim.Muon([self.q.weight], lr=0.02, weight_decay=0.1)
        adamw = torch.optim.AdamW([self.gain, *self.head.parameters()], lr=1e-3)
        optimizers = [muon, adamw] if self.muon_first else [adamw, muon]
        schedulers = [
            {"scheduler": LambdaLR(o, lambda step: min(1.0, (step + 1) / 2)), "interval": "step"}
            for o in optimizers
        ]
        return optimizers, schedulers


@pytest.mark.parametrize("muon_first", [True, False], ids=["muon_first", "adamw_first"])
def test_muon_and_adamw_stepped_by_hand_on_one_loss(tmp_path, muon_first):
    callback = SphericalDynamicsCallback(granularity="channel", every_n_steps=4, window=2)
    run = trainer(tmp_path, callbacks=[callback], max_epochs=3)
    run.fit(MuonQKNorm(muon_first), loader(noisy_classification_data(samples=128)))
    # Each head's rows are a unit of their own; only Muon's steps move it.
    assert callback.report is not None
    assert [(u.name, u.channel_group) for u in callback.report.units] == [("q.weight", 8)]
    monitor = callback.monitor
    assert monitor is not None and monitor.predictions()["q.weight"].optimizer == "Muon"
    state = monitor.state_dict()
    assert state["optimizer_indices"] == [0 if muon_first else 1]
    assert run.global_step == 24 and state["steps_done"] == [12]  # 12 batches, 2 optimizers
    assert [(r.optimizer_step, r.global_step) for r in callback.history] == [
        (4, 8),
        (8, 16),
        (12, 24),
    ]
    for record in callback.history:  # one angle per head
        assert record.channels is not None
        assert 0 < record.channels["min"] <= record.channels["max"]
    assert callback.advice is not None and callback.advice.total_steps == 12
