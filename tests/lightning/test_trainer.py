"""What is read off a Trainer: the budget in each optimizer's own steps, and in global steps."""

from __future__ import annotations

import torch

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
