"""Spherical Motion Dynamics in a Lightning Fabric loop, with the same SphericalMonitor.

Two details matter under Fabric, and this example checks both while it runs:

* names: ``fabric.setup(model, ...)`` returns a wrapper whose ``named_parameters()`` carry a
  ``_forward_module.`` prefix. Units are named after the original module (``model.module``, or
  the module you passed in): find them there and give the monitor that module. The parameters
  are the same tensors, so the names map one to one.
* hooks: ``fabric.setup`` wraps the optimizer too. The monitor's step hooks go on the underlying
  torch optimizer (``optimizer.optimizer``), and they fire when Fabric's ``optimizer.step()`` runs
  the real step through the strategy (a grad-scaler skip fires none, so it is not measured).

The model and data are those of ``digits_demo.py``.

    python examples/fabric_example.py --steps 400
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_demo import DigitsConvNet, digits_datasets
from plain_pytorch import format_window, parse_arguments

from lightning_sdm import SphericalMonitor
from lightning_sdm.invariance import find_scale_invariant_units

WRAPPER_PREFIX = "_forward_module."


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv, __doc__.splitlines()[0])

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(args.seed)
    train, _ = digits_datasets(args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = DigitsConvNet()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    fabric_model, fabric_optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)

    # Names come from the original module; the wrapper's are prefixed.
    original = fabric_model.module
    example, _ = next(iter(loader))
    report = find_scale_invariant_units(original, example)
    print(report.summary())
    units = list(report.units)
    wrapped = dict(fabric_model.named_parameters())
    for name, param in original.named_parameters():
        if wrapped.get(WRAPPER_PREFIX + name) is not param:
            raise RuntimeError(f"{name} is not the same tensor under Fabric's wrapper")
    print(f"names: {units[0].name} (original) = {WRAPPER_PREFIX}{units[0].name} (Fabric wrapper)")

    # Hooks on the torch optimizer that Fabric's optimizer wraps.
    monitor = SphericalMonitor(
        original,
        fabric_optimizer.optimizer,
        units,
        every_n_steps=args.every_n_steps,
        window=args.window,
    ).attach()

    step, windows_seen = 0, 0
    fabric_model.train()
    while step < args.steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(fabric_model(x), y, label_smoothing=0.1)
            fabric_optimizer.zero_grad()
            fabric.backward(loss)
            fabric_optimizer.step()  # Fabric -> strategy -> torch optimizer.step -> our hooks
            step += 1
            windows = monitor.pop_windows()
            windows_seen += len(windows)
            for window in windows:
                print(format_window(window))
            if step >= args.steps:
                break
    monitor.detach()

    expected = (step // args.every_n_steps) * len(monitor.units)
    print(f"\n{step} steps, {windows_seen} windows of {len(monitor.units)} units.")
    if windows_seen != expected:
        raise RuntimeError(
            f"expected {expected} windows: the hooks did not fire at every Fabric optimizer step"
        )
    print("hooks fired at every fabric optimizer.step(): OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
