"""Reproduce the claims of Spherical Motion Dynamics with lightning_sdm, on real data, offline.

Four experiments, each a set of short Lightning runs of a small BatchNorm convnet on scikit-learn's
bundled 8x8 digits (or on CIFAR-10 read from ``--cifar-dir``, the standard
``cifar-10-batches-py`` pickles, no torchvision), measured with nothing but the public API of
``lightning_sdm`` (:class:`~lightning_sdm.SphericalDynamicsCallback`,
:func:`~lightning_sdm.angular_update` and :mod:`lightning_sdm.theory`):

1. equilibrium: SGD (lr x weight decay x momentum) and AdamW (lr x weight decay x beta1) grids,
   measured RMS angular update of every BN-followed conv at equilibrium against the prediction, in
   a regime with stationary gradient noise (labels re-drawn at random for 20% of every batch, so
   the training loss cannot reach zero), and one non-stationary run (clean labels, loss -> 0);
2. LR decay by 10x: the drop, the relaxation to the new prediction and its time against theory
   (MultiStepLR), and SMD's rescaling trick (the callback's ``decay_lr`` + ``rescale_weights``);
3. linear scaling: batch k*B with lr k*eta (k = 1, 2, 4, 8), per-step angle against sqrt(k), and
   the angle between w_t and w_{t+k} at batch B (the callback's ``horizon=k``) against the single
   step at batch k*B;
4. per channel: distribution of the per-channel RMS angular update around the prediction.

    python -m studies.reproduction --out docs --jobs 2     # full report, ~10 CPU-minutes
    python -m studies.reproduction --quick --out /tmp/sdm  # small grid, few hundred steps
    python -m studies.reproduction --cifar-dir ~/data/cifar-10-batches-py --out cifar_report

Writes ``<out>/reproduction.md`` (tables and discussion), ``<out>/figures/*.png`` and
``<out>/results.json`` (every number, per run and per layer).
``tests/theory/test_reproduce_paper.py`` runs ``--quick`` and asserts the claims with tolerances.
"""
