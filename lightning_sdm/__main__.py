"""``python -m lightning_sdm`` runs the ``lightning-sdm`` command (see :mod:`lightning_sdm.cli`)."""

from lightning_sdm.cli import main

raise SystemExit(main())
