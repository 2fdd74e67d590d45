"""After the run, without torch: read a run's logs, draw its figure, the ``lightning-sdm`` command.

``_rundata`` reads TensorBoard event files, ``metrics.csv``, a W&B run (through ``_wandb``) or a
callback's ``history`` into a :class:`RunData`; ``_plot`` draws it (matplotlib, imported on first
use); ``_cli`` is the command line. Nothing here imports torch, torchmetrics or Lightning (a test
holds it to that).
"""

from lightning_sdm.report._cli import format_summary, main
from lightning_sdm.report._plot import plot_run, plot_unit
from lightning_sdm.report._rundata import (
    RunData,
    RunDataError,
    RunDataWarning,
    UnitSummary,
    find_runs,
    load_run,
    run_from_history,
)

__all__ = [
    "RunData",
    "RunDataError",
    "RunDataWarning",
    "UnitSummary",
    "find_runs",
    "format_summary",
    "load_run",
    "main",
    "plot_run",
    "plot_unit",
    "run_from_history",
]
