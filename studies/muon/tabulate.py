"""Writes ``lightning_sdm.theory._muon.DEFAULT_TABLE``: the Monte Carlo memory factor of Muon.

For each Nesterov setting, aspect ratio and momentum of the grid, runs
:func:`lightning_sdm.theory._muon.muon_memory_factor` with torch's default Newton-Schulz settings
and prints ``R_MC / R_linear`` as the Python literal the module holds. About 10 minutes on one
CPU core::

    python -m studies.muon.tabulate
"""

from __future__ import annotations

import time

import torch

from lightning_sdm.theory._muon import (
    _ASPECTS,
    _MOMENTA,
    linear_memory_factor,
    muon_memory_factor,
)


def main() -> None:
    torch.set_num_threads(1)
    print("DEFAULT_TABLE = {")
    for nesterov in (True, False):
        for aspect in _ASPECTS:
            start = time.perf_counter()
            row = [
                muon_memory_factor(aspect, mu, nesterov) / linear_memory_factor(mu, nesterov)
                for mu in _MOMENTA
            ]
            values = ", ".join(f"{value:.4f}" for value in row)
            took = time.perf_counter() - start
            print(f"    ({nesterov}, {aspect}): ({values}),  # {took:.0f} s", flush=True)
    print("}")


if __name__ == "__main__":
    main()
