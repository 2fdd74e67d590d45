"""Lightning plugin: every ``Trainer`` gets the callback when ``LIGHTNING_SDM=1``, no code changes.

Lightning calls the factories registered under the ``lightning.pytorch.callbacks_factory`` entry
point each time a ``Trainer`` is created; this package registers :func:`callbacks_factory` there.
With ``LIGHTNING_SDM`` unset (or ``0``/``false``/``no``/``off``/empty) it returns an empty list and
nothing changes. With ``LIGHTNING_SDM=1`` (or ``true``/``yes``/``on``) it returns one
:class:`EnvSphericalDynamicsCallback` configured from these variables (all optional):

==================================  =============================================================
variable                            argument of :class:`~lightning_sdm.SphericalDynamicsCallback`
==================================  =============================================================
``LIGHTNING_SDM_PARAMS``            ``params``: ``auto``, or comma-separated names/globs/``re:``
``LIGHTNING_SDM_GRANULARITY``       ``granularity``: ``layer`` or ``channel``
``LIGHTNING_SDM_EVERY_N_STEPS``     ``every_n_steps`` (integer)
``LIGHTNING_SDM_WINDOW``            ``window`` (integer)
``LIGHTNING_SDM_TOLERANCE``         ``tolerance`` (number)
``LIGHTNING_SDM_PATIENCE``          ``patience`` (integer)
``LIGHTNING_SDM_ON_EQUILIBRIUM``    ``on_equilibrium``: ``warn``, ``stop`` or ``decay_lr``
``LIGHTNING_SDM_VERBOSE``           ``verbose``: on (1/true/yes/on) or off (0/false/no/off)
==================================  =============================================================

An invalid value raises a ``ValueError`` naming the variable when the ``Trainer`` is created. If
the Trainer (or the LightningModule's ``configure_callbacks``) already has a
``SphericalDynamicsCallback``, that one wins: the plugin's callback removes itself from
``trainer.callbacks`` at ``setup``, before it measures anything. (Lightning calls the factory
without the Trainer, so it cannot know earlier; the plugin's callback has its own ``state_key``
so that the two can coexist until then: Lightning refuses two stateful callbacks with one key.)

Fabric: ``Fabric()`` calls the factories of ``lightning.fabric.callbacks_factory``, where
:func:`fabric_callbacks_factory` is registered. With ``LIGHTNING_SDM`` on it returns one
:class:`~lightning_sdm.lightning.FabricSphericalDynamics`, configured from the same variables
(an invalid one raises in ``Fabric()``; ``LIGHTNING_SDM_EVERY_N_STEPS`` defaults to 50, and an
``LIGHTNING_SDM_ON_EQUILIBRIUM`` other than ``warn`` is reported, not carried out). Fabric calls
few hooks by itself, so that object works differently from the callback: see
:mod:`lightning_sdm.lightning`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_sdm import _messages
from lightning_sdm.lightning._callback import SphericalDynamicsCallback
from lightning_sdm.lightning._fabric import FabricSphericalDynamics, fabric_callback

__all__ = [
    "ENV_PREFIX",
    "EnvSphericalDynamicsCallback",
    "FabricSphericalDynamics",
    "callbacks_factory",
    "fabric_callback",
    "fabric_callbacks_factory",
    "settings_from_env",
]

#: The switch; the settings are ``ENV_PREFIX + "_" + NAME``.
ENV_PREFIX = "LIGHTNING_SDM"
_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def _params(raw: str) -> str | list[str]:
    patterns = [part.strip() for part in raw.split(",") if part.strip()]
    if not patterns:
        raise ValueError("expected 'auto' or comma-separated parameter names/patterns")
    return "auto" if patterns == ["auto"] else patterns


def _switch(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _ON or value in _OFF:
        return value in _ON
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


# variable suffix -> (argument, parser)
_SETTINGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "PARAMS": ("params", _params),
    "GRANULARITY": ("granularity", str.strip),
    "EVERY_N_STEPS": ("every_n_steps", int),
    "WINDOW": ("window", int),
    "TOLERANCE": ("tolerance", float),
    "PATIENCE": ("patience", int),
    "ON_EQUILIBRIUM": ("on_equilibrium", str.strip),
    "VERBOSE": ("verbose", _switch),
}


class EnvSphericalDynamicsCallback(SphericalDynamicsCallback):
    """The callback the plugin adds; it stands down if the Trainer has another one."""

    @property
    @override
    def state_key(self) -> str:
        """Distinct from the plain callback's, so that both may sit in one Trainer."""
        return f"{ENV_PREFIX}:{SphericalDynamicsCallback.__qualname__}"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Leave the Trainer if it has another ``SphericalDynamicsCallback``; else set up."""
        explicit = [
            callback
            for callback in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(callback, SphericalDynamicsCallback) and callback is not self
        ]
        if explicit:
            # A new list: Lightning is iterating over the current one to call `setup`.
            remaining = [cb for cb in trainer.callbacks if cb is not self]  # type: ignore[attr-defined]
            trainer.callbacks = remaining  # type: ignore[attr-defined]
            self._notices.info(_messages.plugin_not_used(ENV_PREFIX))
            return
        super().setup(trainer, pl_module, stage)


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``LIGHTNING_SDM`` asks for the callback.

    Raises:
        ValueError: for a value that is neither on (1/true/yes/on) nor off (0/false/no/off/empty).
    """
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_PREFIX, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"{ENV_PREFIX}={raw!r} is not understood: use 1/true/yes/on to add the "
        "SphericalDynamicsCallback to every Trainer, or 0/false/no/off (or unset it)."
    )


def settings_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The callback's keyword arguments from the ``LIGHTNING_SDM_*`` variables.

    Each value is checked on its own by the callback's validation, so an error names its variable.

    Raises:
        ValueError: for an invalid value (the message names the variable).

    Example::

        >>> settings_from_env({"LIGHTNING_SDM_GRANULARITY": "channel",
        ...                    "LIGHTNING_SDM_PARAMS": "net.0.weight, net.3.*"})
        {'params': ['net.0.weight', 'net.3.*'], 'granularity': 'channel'}
        >>> settings_from_env({"LIGHTNING_SDM_WINDOW": "many"})
        Traceback (most recent call last):
        ...
        ValueError: LIGHTNING_SDM_WINDOW='many' is invalid: invalid literal for int() with base 10: 'many'
    """  # noqa: E501
    environ = os.environ if environ is None else environ
    if not isinstance(environ, Mapping):
        raise ValueError(
            f"`environ` must be a mapping of variable names to values (like os.environ), got "
            f"{type(environ).__name__}."
        )
    settings: dict[str, Any] = {}
    for suffix, (argument, parse) in _SETTINGS.items():
        variable = f"{ENV_PREFIX}_{suffix}"
        raw = environ.get(variable)
        if raw is None or not raw.strip():
            continue
        try:
            value = parse(raw)
            SphericalDynamicsCallback(**{argument: value})  # the callback's own validation
        except (TypeError, ValueError) as error:
            raise ValueError(f"{variable}={raw!r} is invalid: {error}") from None
        settings[argument] = value
    unknown = sorted(
        name
        for name in environ
        if name.startswith(f"{ENV_PREFIX}_") and name[len(ENV_PREFIX) + 1 :] not in _SETTINGS
    )
    if unknown:
        known = ", ".join(f"{ENV_PREFIX}_{suffix}" for suffix in _SETTINGS)
        rank_zero_warn(f"Ignoring unknown variable(s) {', '.join(unknown)}; known: {known}.")
    return settings


def callbacks_factory() -> list[Callback]:
    """Entry point ``lightning.pytorch.callbacks_factory``: ``[]`` unless ``LIGHTNING_SDM`` is on.

    Raises:
        ValueError: for an invalid ``LIGHTNING_SDM*`` value (the message names the variable).
    """
    if not enabled():
        return []
    return [EnvSphericalDynamicsCallback(**settings_from_env())]


def fabric_callbacks_factory() -> list[Any]:
    """Entry point ``lightning.fabric.callbacks_factory``: ``[]`` unless ``LIGHTNING_SDM`` is on.

    With it on, one :class:`~lightning_sdm.lightning.FabricSphericalDynamics` configured
    from the same variables; :func:`fabric_callback` finds it in a ``Fabric``.

    Raises:
        ValueError: for an invalid ``LIGHTNING_SDM*`` value (the message names the variable).
    """
    if not enabled():
        return []
    return [FabricSphericalDynamics(**settings_from_env())]
