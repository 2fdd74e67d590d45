"""Suite-wide isolation from the developer's environment."""

import logging
import os

import pytest


@pytest.fixture(autouse=True)
def _no_plugin_settings_from_the_shell(monkeypatch):
    """`LIGHTNING_SDM*` in a developer's shell would add a callback to every Trainer here."""
    for name in list(os.environ):
        if name.startswith("LIGHTNING_SDM"):
            monkeypatch.delenv(name)


@pytest.fixture
def sdm_log(caplog):
    """The records of the package's logger ``lightning_sdm`` (every level), as ``caplog``.

    Set up like Lightning's, it may not propagate to the root logger (no root handler at import):
    propagation is switched on for the test.
    """
    logger = logging.getLogger("lightning_sdm")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.DEBUG, logger="lightning_sdm"):
        yield caplog
    logger.propagate = propagate
