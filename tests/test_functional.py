import math

import pytest
import torch

from lightning_sdm.functional import (
    COVERAGE,
    angles_from_statistics,
    angular_update,
    angular_update_statistics,
    cosine_from_statistics,
    norms_from_statistics,
    num_units,
)
from tests.reference import reference_angle, reference_angles, rotated

SMALL_ANGLES = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 2.0, 3.0, math.pi - 1e-3]


def _relative_error(value: float, truth: float) -> float:
    return abs(value - truth) / truth


@pytest.mark.parametrize("numel", [100, 10_000, 1_000_000])
@pytest.mark.parametrize("norm_ratio", [0.99, 1.0, 1.01])
def test_accuracy_training_step_regime(numel, norm_ratio):
    """Every angle from 1e-7 rad to pi - 1e-3 rad, norms within 1%: relative error <= 1e-4."""
    generator = torch.Generator().manual_seed(numel)
    prev = torch.randn(numel, generator=generator)
    for angle in SMALL_ANGLES:
        curr = rotated(prev, angle, norm_ratio, generator)
        truth = reference_angle(prev, curr)
        assert _relative_error(angular_update(prev, curr).item(), truth) <= 1e-4, angle


@pytest.mark.parametrize("numel", [100, 10_000, 1_000_000])
@pytest.mark.parametrize("norm_ratio", [0.5, 0.7, 1.5, 2.0])
def test_accuracy_norms_differ_up_to_2x(numel, norm_ratio):
    generator = torch.Generator().manual_seed(numel + 1)
    prev = torch.randn(numel, generator=generator)
    for angle in [a for a in SMALL_ANGLES if a >= 1e-4]:
        curr = rotated(prev, angle, norm_ratio, generator)
        truth = reference_angle(prev, curr)
        assert _relative_error(angular_update(prev, curr).item(), truth) <= 1e-4, angle


def test_accuracy_ten_million_elements():
    generator = torch.Generator().manual_seed(7)
    prev = torch.randn(10_000_000, generator=generator)
    for angle, ratio in [(1e-7, 1.01), (1e-4, 2.0), (math.pi - 1e-3, 1.0)]:
        curr = rotated(prev, angle, ratio, generator)
        truth = reference_angle(prev, curr)
        assert _relative_error(angular_update(prev, curr).item(), truth) <= 1e-4


def test_naive_float32_arccos_is_wrong_where_this_is_right():
    generator = torch.Generator().manual_seed(3)
    prev = torch.randn(10_000, generator=generator)
    curr = rotated(prev, 1e-4, 1.0, generator)
    truth = reference_angle(prev, curr)
    cosine = torch.nn.functional.cosine_similarity(prev, curr, dim=0)
    naive = torch.arccos(cosine.clamp(-1, 1)).item()
    assert _relative_error(naive, truth) > 0.05  # float32 arccos: wrong by >5% (often 100%)
    assert _relative_error(angular_update(prev, curr).item(), truth) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    generator = torch.Generator().manual_seed(11)
    prev = torch.randn(4096, generator=generator).to(dtype)
    curr = rotated(prev.double(), 0.05, 1.0, generator).to(dtype)
    truth = reference_angle(prev, curr)
    assert _relative_error(angular_update(prev, curr).item(), truth) <= 1e-6


@pytest.mark.parametrize(("shape", "dim"), [((8, 3, 3, 3), 0), ((5, 7), 1), ((6, 4, 2), -1)])
def test_per_unit_angles_match_reference(shape, dim):
    generator = torch.Generator().manual_seed(5)
    prev = torch.randn(shape, generator=generator)
    curr = prev + 1e-3 * torch.randn(shape, generator=generator)
    fast = angular_update(prev, curr, dim=dim)
    assert fast.shape == (shape[dim],)
    assert fast.dtype == torch.float64
    expected = torch.tensor(reference_angles(prev, curr, dim), dtype=torch.float64)
    torch.testing.assert_close(fast, expected, rtol=1e-9, atol=0)


def test_batched_statistics_equal_one_by_one_and_do_not_depend_on_chunking():
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (16,), (3, 3, 5, 5), (1000,), (2, 7)]
    prev = [torch.randn(s, generator=generator) for s in shapes]
    curr = [p + 1e-3 * torch.randn(p.shape, generator=generator) for p in prev]
    dims = [0, None, 0, None, 1]
    batched = angular_update_statistics(prev, curr, dim=dims)
    assert batched.shape == (16 + 1 + 3 + 1 + 7, 4)
    one_by_one = torch.cat(
        [angular_update_statistics([p], [c], dim=d) for p, c, d in zip(prev, curr, dims)]
    )
    torch.testing.assert_close(batched, one_by_one, rtol=1e-12, atol=0)
    for chunk in [1, 50, 200, 10_000]:
        chunked = angular_update_statistics(prev, curr, dim=dims, chunk_numel=chunk)
        torch.testing.assert_close(chunked, batched, rtol=1e-12, atol=0)
    angles = angles_from_statistics(batched)
    expected = [a for p, c, d in zip(prev, curr, dims) for a in reference_angles(p, c, d)]
    torch.testing.assert_close(
        angles, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0
    )


def test_statistics_scale_invariance_and_norms():
    generator = torch.Generator().manual_seed(1)
    prev = torch.randn(50, generator=generator)
    curr = 1.5 * prev + 0.1 * torch.randn(50, generator=generator)
    stats = angular_update_statistics([prev], [curr])
    # Summing identical statistics over replicated ranks: the angle is unchanged, and the
    # coverage column restores the norms.
    summed = 4 * stats
    assert summed[0, COVERAGE] == 4
    torch.testing.assert_close(angles_from_statistics(summed), angles_from_statistics(stats))
    prev_norm, curr_norm = norms_from_statistics(summed)
    torch.testing.assert_close(prev_norm, prev.double().norm().reshape(1))
    torch.testing.assert_close(curr_norm, curr.double().norm().reshape(1))


def test_cosine_from_statistics_is_cosine_of_weight_and_step():
    w = torch.tensor([1.0, 0.0, 0.0])
    grad = torch.tensor([0.0, 2.0, 0.0])
    stats = angular_update_statistics([w], [w + grad])
    assert cosine_from_statistics(stats).abs().item() < 1e-15
    stats = angular_update_statistics([w], [w + torch.tensor([1.0, 1.0, 0.0])])
    assert cosine_from_statistics(stats).item() == pytest.approx(1 / math.sqrt(2))


@pytest.mark.parametrize(
    ("prev", "curr"),
    [
        (torch.zeros(5), torch.ones(5)),
        (torch.ones(5), torch.zeros(5)),
        (torch.tensor([1.0, float("nan")]), torch.ones(2)),
        (torch.ones(2), torch.tensor([float("inf"), 1.0])),
    ],
)
def test_undefined_angles_are_nan_not_exceptions(prev, curr):
    assert torch.isnan(angular_update(prev, curr))


def test_nan_in_one_channel_only_affects_that_channel():
    prev = torch.ones(3, 4)
    curr = prev.clone()
    curr[1, 2] = float("nan")
    angles = angular_update(prev, curr, dim=0)
    assert torch.isnan(angles[1])
    assert angles[0] == 0 and angles[2] == 0


def test_opposite_and_identical_vectors():
    w = torch.randn(100)
    assert angular_update(w, w).item() == 0.0
    assert angular_update(w, -w).item() == pytest.approx(math.pi, rel=1e-12)
    assert angular_update(w, 3 * w).item() == pytest.approx(0.0, abs=1e-7)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(4, 3\)"):
        angular_update(torch.ones(3, 4), torch.ones(4, 3))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="same number of tensors"):
        angular_update_statistics([torch.ones(2)], [])
    with pytest.raises(ValueError, match="out of range"):
        angular_update(torch.ones(2, 2), torch.ones(2, 2), dim=2)
    with pytest.raises(ValueError, match="one per tensor"):
        angular_update_statistics([torch.ones(2)], [torch.ones(2)], dim=[0, 0])
    with pytest.raises(ValueError, match="chunk_numel"):
        angular_update_statistics([torch.ones(2)], [torch.ones(2)], chunk_numel=0)
    assert angular_update_statistics([], []).shape == (0, 4)


def test_num_units():
    assert num_units(torch.ones(4, 3), None) == 1
    assert num_units(torch.ones(4, 3), 0) == 4
    assert num_units(torch.ones(4, 3), -1) == 3


def test_no_autograd_graph_and_inputs_untouched():
    prev = torch.randn(10, requires_grad=True)
    curr = (prev.detach() + 0.1).requires_grad_()
    before = (prev.detach().clone(), curr.detach().clone())
    angle = angular_update(prev, curr)
    assert not angle.requires_grad
    assert torch.equal(prev.detach(), before[0]) and torch.equal(curr.detach(), before[1])


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e200, 1e300])
def test_float64_weights_of_extreme_norm_keep_their_angle(scale):
    # Their squares would overflow (or underflow) float64: a power-of-two rescale is exact.
    generator = torch.Generator().manual_seed(3)
    prev = torch.randn(1000, dtype=torch.float64, generator=generator)
    curr = rotated(prev, 0.3, 1.01, generator)
    expected = reference_angle(prev, curr)
    assert angular_update(prev * scale, curr * scale).item() == pytest.approx(expected, rel=1e-12)
    per_row = angular_update(
        (prev * scale).reshape(10, 100), (curr * scale).reshape(10, 100), dim=0
    )
    assert torch.allclose(
        per_row,
        torch.tensor(
            reference_angles(prev.reshape(10, 100), curr.reshape(10, 100), 0), dtype=torch.float64
        ),
        rtol=1e-12,
    )
