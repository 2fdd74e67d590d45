"""Spherical Motion Dynamics of a small QK-norm decoder LLM trained with Muon + AdamW, offline.

The model and the training are ``examples/llm_qknorm.py`` (a Qwen3-style byte-level decoder on
the Python standard library's own sources, ~0.9M parameters, Muon on the blocks' matrices and
AdamW on the rest, warm-up + cosine per batch, manual optimization). Each arm is one Lightning
fit with the default :class:`~lightning_sdm.SphericalDynamicsCallback` at
``granularity="channel"`` (one angle per attention head of every q/k projection):

* ``muon``: the recipe of the example, ``torch.optim.Muon`` on the hidden matrices;
* ``adamw``: the same model, data and schedule with AdamW on the hidden matrices too (the
  baseline most LLMs were trained with), whose QK-norm units have a published prediction.

Per unit it records what the callback logged (per-head angles, the prediction of the unit's
param group, the ratio, the weight norm, the detector's regime), and the monitor's own cost
(host time in its hooks against the step time, measured in the same run).

    python -m studies.llm --out docs          # docs/llm.md + docs/figures/llm_qknorm.png
    python -m studies.llm --quick --out /tmp/llm   # a tiny model for a few steps (the test)

``--raw FILE`` keeps every recorded number; ``--from-raw FILE`` re-renders the report from it.
"""
