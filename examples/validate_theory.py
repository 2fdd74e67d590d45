"""Check the equilibrium formulas of lightning_sdm.theory against the real torch optimizers.

No network and no data: every row of a ``[rows, dim]`` parameter gets, at every step, a gradient of
fresh Gaussian noise projected orthogonal to the row and divided by its norm (a scale-invariant
loss under stationary gradient noise, see ``lightning_sdm.theory.simulate_scale_invariant``).
Each optimizer starts near the equilibrium norm theory predicts, runs a burn-in of three relaxation
times (so a wrong formula would show almost in full), and the RMS of the per-step, per-row angle
is then compared with ``equilibrium_angular_update``.

    python examples/validate_theory.py            # full grid, ~30 s on one CPU core
    python examples/validate_theory.py --quick    # a few cases

The grid, the burn-in rule and the reference Lion live in :mod:`lightning_sdm.theory.check_grid`;
``tests/theory/test_theory.py`` asserts measured/predicted within 3% on the same grid, except the
documented ``KNOWN_DEVIATIONS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lightning_sdm.theory.check_grid import CASES, KNOWN_DEVIATIONS, QUICK, Row, measure


def markdown_table(rows: Sequence[Row]) -> str:
    """The table: optimizer | hyper-parameters | predicted | measured RMS | measured/predicted."""
    lines = [
        "| optimizer | hyper-parameters | predicted | measured RMS | measured/predicted |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        optimizer, _, hyper = row.case.label.partition(" ")
        predicted = row.prediction.angular_update
        predicted_text = f"{predicted:.5f}" if predicted is not None else "none"
        ratio = row.ratio
        ratio_text = f"{ratio:.4f}" if ratio is not None else "-"
        if row.case.name in KNOWN_DEVIATIONS:
            ratio_text += " (known deviation)"
        lines.append(
            f"| {optimizer} | {hyper} | {predicted_text} | {row.measured:.5f} | {ratio_text} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="measured steps after burn-in")
    parser.add_argument("--rows", type=int, default=8, help="independent invariant units")
    parser.add_argument("--dim", type=int, default=1000, help="elements per unit (fan-in)")
    parser.add_argument("--quick", action="store_true", help="a few cases only")
    args = parser.parse_args(argv)
    # The tensors are small: extra intra-op threads only add synchronisation, and on a busy
    # machine they made the simulation up to 8x slower.
    torch.set_num_threads(1)

    cases = [case for case in CASES if not args.quick or case.name in QUICK]
    rows = []
    for case in cases:
        row = measure(case, steps=args.steps, rows=args.rows, dim=args.dim)
        rows.append(row)
        print(f"{case.name}: burn-in {row.burn_in}, {row.seconds:.1f}s", flush=True)
    print()
    print(markdown_table(rows))
    for row in rows:
        if row.case.name in KNOWN_DEVIATIONS:
            print(f"\n{row.case.name}: {KNOWN_DEVIATIONS[row.case.name][0]}")


if __name__ == "__main__":
    main()
