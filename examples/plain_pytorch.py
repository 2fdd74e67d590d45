"""Spherical Motion Dynamics in a plain PyTorch training loop: no Trainer, no Fabric.

The measuring core of the Lightning callback, :class:`lightning_sdm.SphericalMonitor`, attaches to
any ``nn.Module`` and optimizer:

1. find the scale-invariant units by following one forward pass on an example batch
   (:func:`lightning_sdm.invariance.find_scale_invariant_units`);
2. ``SphericalMonitor(model, optimizer, units, every_n_steps=..., window=...).attach()`` registers
   optimizer step hooks (nothing in the loop changes);
3. after ``optimizer.step()``, ``monitor.pop_windows()`` returns the windows that closed: per unit
   the RMS angular update over the window, the predicted equilibrium and their ratio.

An :class:`lightning_sdm.EquilibriumDetector` turns the windows into equilibrium decisions.
The model and data are those of ``digits_demo.py`` (the LightningModule is used as a plain
``nn.Module``: only its ``forward`` runs).

    python examples/plain_pytorch.py --steps 400
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_demo import DigitsConvNet, digits_datasets

from lightning_sdm import EquilibriumDetector, SphericalMonitor, UnitWindow
from lightning_sdm.invariance import find_scale_invariant_units


def format_window(window: UnitWindow) -> str:
    theory = f"{window.theory:.5f}" if window.theory is not None else "n/a"
    ratio = f"{window.ratio:.3f}" if window.ratio is not None else "n/a"
    return (
        f"step {window.optimizer_step:>5}  {window.unit:<20} measured {window.angular_update:.5f}  "
        f"theory {theory}  ratio {ratio}  |w| {window.weight_norm:.3f}"
    )


def parse_arguments(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The options of this example, shared with ``fabric_example.py``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every-n-steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv, __doc__.splitlines()[0])

    torch.manual_seed(args.seed)
    train, _ = digits_datasets(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = DigitsConvNet()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )

    # 1. Which weights are scale-invariant: follow one forward pass (the model is left unchanged).
    example, _ = next(iter(loader))
    report = find_scale_invariant_units(model, example)
    print(report.summary())

    # 2. Hooks on the optimizer: the training loop below is an ordinary one.
    monitor = SphericalMonitor(
        model,
        optimizer,
        report,  # its units; or a list of lightning_sdm.Unit
        every_n_steps=args.every_n_steps,
        window=args.window,
    ).attach()
    detector = EquilibriumDetector(tolerance=0.1, patience=3)

    step, windows_seen = 0, 0
    model.train()
    while step < args.steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            # 3. Windows closed by this step (empty on most steps).
            windows = monitor.pop_windows()
            windows_seen += len(windows)
            for window in windows:
                print(format_window(window))
            for unit in detector.update(windows):
                print(f"  -> {unit} reached equilibrium at step {step}")
            if step >= args.steps:
                break
    monitor.detach()

    print(f"\n{step} steps, {windows_seen} windows of {len(monitor.units)} units.")
    for unit, (status, cosine) in monitor.invariance.items():
        print(f"{unit}: gradient orthogonality {status} (max |cos(w, grad)| = {cosine:.1e})")
    print(f"Units in equilibrium at the end: {detector.fraction():.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
