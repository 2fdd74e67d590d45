"""The trajectory study (studies/trajectory) in a short version: one run per optimizer.

The full table is ``docs/trajectory.md`` (``python -m studies.trajectory --out docs``). Here: a
real BatchNorm network on digits under warm-up + cosine, measured at every step by an
independent float64 recorder, against the monitor's trajectory and the default detector.
"""

import math
import random

import pytest
import torch

from studies.trajectory.run import (
    Row,
    pooled_reference,
    reference_noise,
    run,
    schedule_factor,
    summarize,
)

# An end-to-end training run: the slow lane (`make test-fast` skips it).
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("optimizer", ["sgdm", "adamw"])
def test_trajectory_and_detector_on_digits_under_warmup_cosine(optimizer):
    torch.set_num_threads(1)
    rows = run("digits", optimizer, "warmup_cosine", steps=1200)
    assert {r.unit for r in rows} == {"0.weight", "3.weight", "7.weight"}
    summary = summarize(rows)
    # The study's run (docs/trajectory.md): 98% (SGD-M and AdamW) of the windows within 10% of
    # the dense reference over every step of the last relaxation time; the model before each
    # window took its update size from a running mean and its norm from its own integration:
    # 85% and 85%. Recall 87% and 91%; bounds with room for other CPUs' numerics.
    assert summary["accuracy"] >= 0.9, summary
    assert summary["recall"] >= 0.8, summary
    # The trajectory moves away from the static prediction as the LR collapses (it is not the
    # static prediction in disguise): late windows lag it.
    late = [r for r in rows if r.step > 1100 and math.isfinite(r.trajectory)]
    assert late and sum(r.trajectory / r.theory for r in late) / len(late) < 0.95


def test_schedules_have_their_shape():
    assert schedule_factor("step", 100)(60) == pytest.approx(0.1)
    assert schedule_factor("wsd", 100)(50) == 1.0 and schedule_factor("wsd", 100)(90) < 0.6
    assert schedule_factor("onecycle", 100)(0) == pytest.approx(0.04)
    assert schedule_factor("linear_to_zero", 100)(99) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_factor("nope", 10)(0)


def _rows(rng, windows, spread):
    """Synthetic rows: every step's squared angle is the prediction times chi-square(1) noise
    (mean 1: a perfect prediction), the prediction's update size off by ``exp(N(0, spread))``."""
    rows = []
    for i in range(windows):
        off = math.exp(rng.gauss(0.0, spread))
        dense = [rng.gauss(0.0, 1.0) ** 2 for _ in range(20)]
        interval = math.sqrt(sum(dense) / 20)
        rows.append(
            Row("t", "o", "s", "u", 20 * (i + 1), 0.1, 1.0, interval, interval,
                math.sqrt(off), 20, 1.0, 1.0, "tracking", True, float(i),
                (sum(dense[:10]) / 10, sum(dense[10:]) / 10), (off, off))
        )  # fmt: skip
    return rows


def test_reference_noise_reads_the_reference_error_not_the_predictions():
    rng = random.Random(3)

    def p90(values):
        finite = sorted(abs(v) for v in values if math.isfinite(v))
        return finite[int(0.9 * len(finite))]

    exact = _rows(rng, 3000, 0.0)
    # A perfect prediction: the reference's error is its own sampling noise, which the split
    # halves read (chi-square(1) per step, 60 steps: ~15% on the RMS at the 90th percentile).
    error = p90([x - 1 for x in pooled_reference(exact)])
    noise = p90(reference_noise(exact))
    assert 0.1 < error < 0.2 and noise == pytest.approx(error, rel=0.15)
    # Update sizes off by 40% (1 sd) per window: the reference sees them, the halves do not.
    off = _rows(rng, 3000, 0.4)
    assert p90([x - 1 for x in pooled_reference(off)]) > 1.3 * error
    assert p90(reference_noise(off)) == pytest.approx(error, rel=0.15)
