"""Suite-wide isolation from the developer's environment."""

import os

import pytest


@pytest.fixture(autouse=True)
def _no_plugin_settings_from_the_shell(monkeypatch):
    """`LIGHTNING_SDM*` in a developer's shell would add a callback to every Trainer here."""
    for name in list(os.environ):
        if name.startswith("LIGHTNING_SDM"):
            monkeypatch.delenv(name)
