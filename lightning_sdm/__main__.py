"""``python -m lightning_sdm`` runs the ``lightning-sdm`` command (:mod:`lightning_sdm.report`)."""

from lightning_sdm.report._cli import main

raise SystemExit(main())
