"""Keeping the monitor's hooks out of ``torch.compile``.

Dynamo inlines forward hooks, optimizer step hooks and ``TorchFunctionMode`` handlers into the
graphs it builds; the tracer's and the monitor's bookkeeping (dictionaries keyed by tensor ids,
growing lists) then guard on values that change every call, and a compiled model recompiles
until it hits ``recompile_limit``. These functions run eagerly instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["outside_compile"]

F = TypeVar("F", bound=Callable[..., Any])


def outside_compile(function: F) -> F:
    """``function``, excluded from dynamo tracing when dynamo is in use.

    Only when ``torch._dynamo`` is already imported (a ``torch.compile`` was set up): importing it
    costs about a second, which a run without compilation should not pay.

    Example::

        >>> outside_compile(len)([1, 2])
        2
    """
    if "torch._dynamo" not in sys.modules:
        return function
    return torch.compiler.disable(function, recursive=True)
