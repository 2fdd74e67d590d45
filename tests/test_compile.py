"""torch.compile'd models: the monitor's hooks stay out of dynamo (no recompiles because of it)."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_sdm import SphericalDynamicsCallback
from tests.helpers import BNNet, loader, noisy_classification_data, trainer


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _fit(tmp_path, compiled: bool) -> SphericalDynamicsCallback:
    torch.manual_seed(0)
    module = BNNet()
    if compiled:
        module.net = torch.compile(module.net, backend="eager")  # dynamo only: no C compiler
    callback = SphericalDynamicsCallback(every_n_steps=2, window=2)
    trainer(tmp_path / str(compiled), callbacks=[callback], max_epochs=2).fit(
        module, loader(noisy_classification_data(), shuffle=False)
    )
    return callback


def test_a_compiled_model_never_recompiles_because_of_the_monitor(tmp_path) -> None:
    torch._dynamo.reset()
    records = _Records()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(records)
    torch._logging.set_logs(recompiles=True)
    try:
        compiled = _fit(tmp_path, compiled=True)
    finally:
        torch._logging.set_logs()
        dynamo_log.removeHandler(records)
    mentions = [m for m in records.messages if "lightning_sdm" in m or "recompile_limit" in m]
    assert mentions == []
    eager = _fit(tmp_path, compiled=False)
    assert [u.name.replace("_orig_mod.", "") for u in compiled.report.units] == [
        u.name for u in eager.report.units
    ]
    assert len(compiled.history) == len(eager.history) == 32
    for a, b in zip(compiled.history, eager.history, strict=True):
        assert a.angular_update == pytest.approx(b.angular_update, rel=1e-5)
