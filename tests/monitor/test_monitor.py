import math

import pytest
import torch
from torch import nn

from lightning_sdm import SphericalMonitor, Unit


class Rotor(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.weight.data[0] = 1.0


def _drive(monitor_kwargs, step_direction, steps=24):
    """Plain SGD(lr=1) whose 'gradient' is minus the step we want: exact, known rotations."""
    model = Rotor()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    monitor = SphericalMonitor(model, optimizer, [Unit("weight", ("weight",))], **monitor_kwargs)
    monitor.attach()
    for t in range(steps):
        model.weight.grad = -step_direction(model.weight.detach(), t)
        optimizer.step()
    monitor.detach()
    return monitor.pop_windows()


def test_horizon_of_a_coherent_rotation_adds_angles():
    theta = 1e-3

    def rotate(w, t):  # rotation by theta in the (e0, e1) plane
        c, s = math.cos(theta), math.sin(theta)
        new = w.clone()
        new[0], new[1] = c * w[0] - s * w[1], s * w[0] + c * w[1]
        return new - w

    windows = _drive({"every_n_steps": 8, "window": 8, "horizon": 4}, rotate)
    assert len(windows) == 3
    for window in windows:
        assert window.angular_update == pytest.approx(theta, rel=1e-9)
        assert window.horizon_angular_update == pytest.approx(4 * theta, rel=1e-9)


def test_horizon_of_a_random_walk_grows_like_sqrt_h():
    generator = torch.Generator().manual_seed(0)
    theta = 1e-3

    def random_step(w, t):
        noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        noise -= (noise @ w) / (w @ w) * w
        return theta * w.norm() * noise / noise.norm()

    windows = _drive({"every_n_steps": 400, "window": 400, "horizon": 16}, random_step, steps=400)
    (window,) = windows
    assert window.angular_update == pytest.approx(theta, rel=1e-3)
    ratio = window.horizon_angular_update / window.angular_update
    assert ratio == pytest.approx(4.0, rel=0.15)  # sqrt(16): the k-step angles do not add


def test_measured_steps_and_memory_between_windows():
    windows = _drive({"every_n_steps": 10, "window": 3}, lambda w, t: 1e-3 * torch.ones_like(w))
    assert [(w.optimizer_step, w.steps) for w in windows] == [(10, 3), (20, 3)]


def test_invalid_horizon():
    model = Rotor()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="`horizon`"):
        SphericalMonitor(model, optimizer, [Unit("weight", ("weight",))], window=4, horizon=5)


def test_unit_errors_are_named_before_any_step():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"`channel_dim`=5 is out of range .* shape \(4, 4\)"):
        SphericalMonitor(
            model, optimizer, [Unit("0.weight", ("0.weight",), channel_dim=5)], every_n_steps=2
        )
    complex_model = torch.nn.Module()
    complex_model.w = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    complex_opt = torch.optim.SGD(complex_model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"'w' is torch.complex64; angular updates are defined"):
        SphericalMonitor(complex_model, complex_opt, [Unit("w", ("w",))], every_n_steps=2)


def test_functional_refuses_complex_and_integer_tensors():
    from lightning_sdm.functional import angular_update

    z = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"real floating-point tensors, got torch\.complex64"):
        angular_update(z, z * 1j)
    with pytest.raises(ValueError, match=r"got torch\.int64"):
        angular_update(torch.arange(3), torch.arange(3) + 1)


def _trajectory_run(steps, state=None, lr_at=lambda t: 0.1):
    """A BatchNorm-free invariant weight (gradient projected orthogonal) under SGD-M with wd."""
    torch.manual_seed(0)
    model = Rotor(dim=32)
    model.weight.data = torch.randn(32, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    monitor = SphericalMonitor(
        model, optimizer, [Unit("weight", ("weight",))], every_n_steps=10, window=2
    )
    if state is not None:
        monitor.load_state_dict(state)
    monitor.attach()
    for t in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(t)
        w = model.weight.detach()
        noise = torch.randn(32, dtype=torch.float64, generator=generator)
        model.weight.grad = (noise - (noise @ w) / (w @ w) * w) / w.norm()
        optimizer.step()
    monitor.detach()
    return monitor, monitor.pop_windows()


def test_the_trajectory_is_predicted_from_the_second_window_and_checkpointed():
    monitor, windows = _trajectory_run(40)
    assert windows[0].trajectory is None
    assert all(w.trajectory is not None and w.trajectory > 0 for w in windows[1:])
    state = monitor.state_dict()
    assert list(state["trajectories"]) == ["weight"]
    assert state["window_schedules"] == [[]]  # the window just closed: nothing pending
    _, more = _trajectory_run(10, state=state)
    assert more[0].trajectory is not None  # the restored state predicts at once
    # A checkpoint from before Adam's memory was carried holds (q, G): it still loads.
    old = {name: value[:2] for name, value in state["trajectories"].items()}
    _, resumed = _trajectory_run(10, state={**state, "trajectories": old})
    assert resumed[0].trajectory == pytest.approx(more[0].trajectory)
    with pytest.raises(ValueError, match="trajectories"):
        _trajectory_run(0, state={**state, "trajectories": {"weight": ["q", 1.0]}})
    with pytest.raises(ValueError, match="window_schedules"):
        _trajectory_run(0, state={**state, "window_schedules": [[[True, [0.1], "x"]]]})


def test_the_trajectory_follows_a_per_step_lr_between_windows():
    """The LR halves at an unmeasured step: the next window's prediction halves at once.

    Against the same run at a constant LR (identical up to step 45): the window's update size
    is the last window's measurement, noisy for 32 elements, so the two runs share it.
    """
    _, windows = _trajectory_run(60, lr_at=lambda t: 0.1 if t < 45 else 0.05)
    _, constant = _trajectory_run(60)
    after = windows[4]  # windows close after steps 40 and 50
    assert windows[3].trajectory == constant[3].trajectory
    assert after.trajectory / constant[4].trajectory == pytest.approx(0.5, rel=0.05)
    assert after.angular_update / after.trajectory == pytest.approx(1.0, abs=0.3)


def _adamw_run(steps, state=None, seed=1):
    """An invariant weight (gradient projected orthogonal) under AdamW, windows of 5 steps,
    started at its equilibrium norm ``sqrt(lr * 256 / (2 wd))``."""
    torch.manual_seed(0)
    model = Rotor(dim=256)
    model.weight.data = torch.randn(256)
    model.weight.data *= 1.6 / model.weight.data.norm()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.5)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        model.weight.data = state["weight"].clone()
        generator.set_state(state["generator"])
    monitor = SphericalMonitor(
        model, optimizer, [Unit("weight", ("weight",))], every_n_steps=5, window=5
    )
    if state is not None:
        monitor.load_state_dict(state["monitor"])
    monitor.attach()
    for _ in range(steps):
        w = model.weight.detach()
        noise = torch.randn(256, generator=generator)
        model.weight.grad = (noise - (noise @ w) / (w @ w) * w) / w.norm()
        optimizer.step()
    monitor.detach()
    saved = {
        "monitor": monitor.state_dict(),
        "optimizer": optimizer.state_dict(),
        "weight": model.weight.detach().clone(),
        "generator": generator.get_state(),
    }
    return saved, monitor.pop_windows()


def test_the_radial_balance_pools_over_windows_and_is_checkpointed():
    """The radial part is pooled over the recent windows: a resumed run continues the pool, so
    its windows read the same balance as the uninterrupted run's; a damaged pool is refused."""
    _, straight = _adamw_run(20)
    assert all(w.balance is not None and w.balance > 0 for w in straight)
    state, first = _adamw_run(10)
    assert list(state["monitor"]["radial"]) == ["weight"]
    _, resumed = _adamw_run(10, state=state)
    got = [w.balance for w in first + resumed]
    assert got == pytest.approx([w.balance for w in straight], rel=1e-9)
    # Without the pool the third window reads its own two windows' worth: another value.
    fresh = {**state, "monitor": {**state["monitor"], "radial": {}}}
    _, restarted = _adamw_run(10, state=fresh)
    assert restarted[0].balance != pytest.approx(straight[2].balance, rel=1e-9)
    with pytest.raises(ValueError, match="radial"):
        _adamw_run(0, state={**state, "monitor": {**state["monitor"], "radial": {"weight": [1]}}})


def test_no_radial_balance_where_the_weights_dtype_cannot_hold_the_decay():
    """bfloat16 weights under AdamW with lr * wd = 5e-3 decay (above half bfloat16's epsilon,
    0.0039); with lr * wd = 1e-3 ``w * (1 - lr wd)`` rounds back to ``w``: no decay happens, and
    the balance, which assumes it, is not given (a probe saw a finite one)."""
    for lr, expected in ((0.01, True), (0.002, False)):
        torch.manual_seed(0)
        model = Rotor(dim=256).to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.5)
        monitor = SphericalMonitor(
            model, optimizer, [Unit("weight", ("weight",))], every_n_steps=5, window=5
        ).attach()
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            w = model.weight.detach().float()
            noise = torch.randn(256, generator=generator)
            grad = (noise - (noise @ w) / (w @ w) * w) / w.norm()
            model.weight.grad = grad.to(torch.bfloat16)
            optimizer.step()
        monitor.detach()
        windows = monitor.pop_windows()
        assert windows and all(w.theory is not None for w in windows)
        assert all((w.balance is not None) == expected for w in windows), (lr, windows)
