"""Levenberg–Marquardt against scipy.optimize.least_squares(method="lm") on nonlinear least squares."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares
from torch import nn
from torch.func import functional_call

from curvature.damping import DelayedGratification
from optimizers.levenberg_marquardt import LevenbergMarquardt, uphill_accepts

F64 = torch.float64


def half_sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum()


class SumOfExponentials(nn.Module):
    """y(t) = a1 exp(-b1 t) + a2 exp(-b2 t)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 1.0], dtype=F64))
        self.b = nn.Parameter(torch.tensor([0.5, 2.0], dtype=F64))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (self.a * torch.exp(-self.b * t[:, None])).sum(1)


def _exp_data(device, noise: float):
    t = torch.linspace(0, 4, 40, dtype=F64)
    y = 2.0 * torch.exp(-0.7 * t) + 1.0 * torch.exp(-3.0 * t)
    y = y + noise * torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=F64)
    return t.to(device), y.to(device)


TEACHER = {"0.weight": [[1.5], [-2.0]], "0.bias": [0.5, -0.3], "2.weight": [[1.0, 0.8]], "2.bias": [0.1]}


def _mlp(device, perturb: float = 0.3):
    """A 1-2-1 tanh network at the teacher's weights plus a seeded perturbation."""
    model = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)).to(dtype=F64)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i), dtype=F64)
            p.copy_(torch.tensor(TEACHER[name], dtype=F64) + perturb * noise)
    return model.to(device)


def _mlp_data(device, noise: float):
    x = torch.linspace(-3, 3, 40, dtype=F64)[:, None]
    with torch.no_grad():
        y = _mlp("cpu", perturb=0.0)(x)
    y = y + noise * torch.randn(40, 1, generator=torch.Generator().manual_seed(1), dtype=F64)
    return x.to(device), y.to(device)


def _run(model, x, y, steps: int, **kw):
    opt = LevenbergMarquardt(model, half_sse, max_cg_iters=60, cg_tol=1e-14, **kw)

    def closure():
        opt.zero_grad()
        loss = half_sse(model(x), y)
        loss.backward()
        return loss

    losses, thetas = [], []
    for _ in range(steps):
        losses.append(float(opt.step(closure, targets=y).detach()))
        thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    return opt, losses, thetas


def _scipy(model, x, y, theta0: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    xc, yc = x.cpu(), y.cpu()
    model_cpu = type(model)() if isinstance(model, SumOfExponentials) else _mlp("cpu")

    def residuals(t: np.ndarray) -> np.ndarray:
        pieces = torch.split(torch.from_numpy(t), [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, pieces, shapes)}
        return (functional_call(model_cpu, params, (xc,)) - yc).reshape(-1).numpy()

    r = least_squares(residuals, theta0.cpu().numpy(), method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return r.x, 0.5 * float(r.fun @ r.fun)


@pytest.mark.parametrize("momentum", [False, True])
def test_sum_of_exponentials_reaches_scipy_lm_minimum(device, momentum):
    t, y = _exp_data(device, noise=0.01)
    model = SumOfExponentials().to(device)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt, losses, thetas = _run(model, t, y, 40, momentum=momentum)
    x_ref, f_ref = _scipy(model, t, y, theta0)
    np.testing.assert_allclose(thetas[-1].cpu().numpy(), x_ref, rtol=1e-7, atol=1e-8)
    assert math.isclose(losses[-1], f_ref, rel_tol=1e-9)
    assert opt.counters["products"] > 0 and opt.counters["loss_evals"] > 0


def test_mlp_regression_reaches_scipy_lm_minimum(device):
    x, y = _mlp_data(device, noise=0.01)
    model = _mlp(device)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    _, losses, thetas = _run(model, x, y, 30)
    x_ref, f_ref = _scipy(model, x, y, theta0)
    assert math.isclose(losses[-1], f_ref, rel_tol=1e-9)
    np.testing.assert_allclose(thetas[-1].cpu().numpy(), x_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("problem", ["exponentials", "mlp"])
def test_superlinear_convergence_near_a_zero_residual_minimum(device, problem):
    """Errors e_k = |theta_k - theta*| shrink faster than any fixed linear rate at the end."""
    if problem == "exponentials":
        x, y = _exp_data(device, noise=0.0)
        model = SumOfExponentials().to(device)
    else:
        x, y = _mlp_data(device, noise=0.0)
        model = _mlp(device)
    _, losses, thetas = _run(model, x, y, 40)
    star = thetas[-1]
    assert losses[-1] < 1e-20
    errors = [float((th - star).norm()) for th in thetas[:-1]]
    tail = [e for e in errors if 1e-11 < e < 1e-2]
    assert len(tail) >= 3, errors
    ratios = [b / a for a, b in zip(tail, tail[1:])]
    assert ratios[-1] < 0.05 and ratios[-1] < ratios[0], ratios


def test_damping_schedule_lowers_after_success_and_raises_after_failure(device):
    t, y = _exp_data(device, noise=0.01)
    model = SumOfExponentials().to(device)
    opt = LevenbergMarquardt(model, half_sse, damping=1e-3)
    assert isinstance(opt.damping, DelayedGratification)

    def closure():
        opt.zero_grad()
        loss = half_sse(model(t), y)
        loss.backward()
        return loss

    opt.step(closure, targets=y)
    info = opt.last_step
    assert info.reduction_ratio > 0 and math.isclose(opt.damping.damping, 1e-3 / 3)
    # a step scale of 1e3 overshoots: rho at the full step is still > 0 here, so force failure with lr
    model2 = SumOfExponentials().to(device)
    opt2 = LevenbergMarquardt(model2, half_sse, damping=1e-8, max_line_search=0)
    with torch.no_grad():
        model2.b.copy_(torch.tensor([5.0, 9.0], dtype=F64, device=device))

    def closure2():
        opt2.zero_grad()
        loss = half_sse(model2(t), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model2.parameters()]
    opt2.step(closure2, targets=y)
    if opt2.last_step.reduction_ratio <= 0:
        assert math.isclose(opt2.damping.damping, 2e-8)
        assert not opt2.last_step.accepted and opt2.counters["rejected_steps"] == 1
        assert all(torch.equal(a, b.detach()) for a, b in zip(before, model2.parameters()))
    else:  # pragma: no cover - the setup is chosen so that the GN step overshoots
        pytest.fail(f"expected an overshooting Gauss-Newton step, got rho={opt2.last_step.reduction_ratio}")


def test_uphill_acceptance_rule(device):
    """(1 - cos beta)^b F' <= F with b = 2: along the previous step (cos 0.9) F may grow up to 100x;
    turning back (cos -1) needs F' <= F/4; orthogonal (cos 0) needs a plain decrease."""
    prev = torch.tensor([1.0, 0.0], dtype=F64, device=device)
    along = torch.tensor([0.9, math.sqrt(1 - 0.81)], dtype=F64, device=device)
    assert uphill_accepts(99.0, 1.0, along, prev, 2.0) and not uphill_accepts(101.0, 1.0, along, prev, 2.0)
    back = -prev
    assert uphill_accepts(0.24, 1.0, back, prev, 2.0) and not uphill_accepts(0.26, 1.0, back, prev, 2.0)
    ortho = torch.tensor([0.0, 1.0], dtype=F64, device=device)
    assert uphill_accepts(1.0, 1.0, ortho, prev, 2.0) and not uphill_accepts(1.01, 1.0, ortho, prev, 2.0)
    assert not uphill_accepts(float("nan"), 1.0, along, prev, 2.0)
    assert not uphill_accepts(0.5, 1.0, torch.zeros(2, dtype=F64, device=device), prev, 2.0)


def test_uphill_steps_are_recorded_and_obey_the_rule(device):
    t, y = _exp_data(device, noise=0.01)
    model = SumOfExponentials().to(device)
    opt = LevenbergMarquardt(model, half_sse, uphill=True, max_line_search=0)
    seen = []

    def closure():
        opt.zero_grad()
        loss = half_sse(model(t), y)
        loss.backward()
        return loss

    opt.register_step_hook(seen.append)
    for _ in range(15):
        opt.step(closure, targets=y)
    assert len(seen) == 15
    for info in seen:
        if info.accepted and info.loss_after >= info.loss:
            assert info.details.get("uphill") is True
        if info.accepted:
            assert info.loss_after < info.loss or info.details.get("uphill") is True


# ------------------------------------------------------------------ maximum-diagonal damping
def _jtj_diagonal(model, x):
    """Oracle: diag(J^T J)/N from the dense Jacobian of the flattened outputs (N*O x n)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def out(*ps):
        return functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

    jac = torch.func.jacrev(out, argnums=tuple(range(len(params))))(*params)
    j = torch.cat([t.reshape(t.shape[0], -1) for t in jac], dim=1)
    return torch.diagonal(j.T @ j) / x.shape[0], j


def _mse_mean(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _step(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = _mse_mean(model(x), y)
        loss.backward()
        return loss

    opt.step(closure, targets=y)


def test_max_diagonal_damping_is_the_running_max_of_the_dense_jtj_diagonal(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(device=device, dtype=F64)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(10, 2, generator=gen, dtype=F64).to(device),
                torch.randn(10, 2, generator=gen, dtype=F64).to(device)) for _ in range(3)]
    opt = LevenbergMarquardt(model, _mse_mean, damping=0.5, damping_matrix="max_diagonal", diagonal_floor=0.0)
    running = None
    for x, y in batches:
        diag, _ = _jtj_diagonal(model, x)
        running = diag if running is None else torch.maximum(running, diag)
        _step(opt, model, x, y)
        torch.testing.assert_close(opt._get_vector("max_diagonal"), running, rtol=1e-12, atol=1e-15)
    # the max genuinely moved between steps for some coordinates (the test can tell a max from a last value)
    assert not torch.allclose(running, diag)


def test_max_diagonal_step_solves_with_lambda_d(device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(device=device, dtype=F64)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(10, 2, generator=gen, dtype=F64).to(device), torch.randn(10, 2, generator=gen, dtype=F64).to(device)
    lam = 0.7
    diag, j = _jtj_diagonal(model, x)
    ggn = j.T @ j / x.shape[0]  # half squared error summed over outputs, mean over the batch
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    g = torch.cat([t.reshape(-1) for t in torch.func.grad(
        lambda ps: _mse_mean(functional_call(model, ps, (x,)), y))(
        {n: p.detach() for n, p in zip(names, model.parameters())}).values()])
    d = torch.clamp(diag, min=1e-6 * float(diag.max()))
    expected = -torch.linalg.solve(ggn + lam * torch.diag(d), g)
    opt = LevenbergMarquardt(model, _mse_mean, damping=DelayedGratification(lam), damping_matrix="max_diagonal",
                             max_line_search=0, cg_tol=1e-14)
    _step(opt, model, x, y)
    assert opt.last_step.accepted
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after - theta, expected, rtol=1e-8, atol=1e-11)
    # the identity damping solves another system (the option changes the step)
    other = -torch.linalg.solve(ggn + lam * torch.eye(ggn.shape[0], dtype=F64, device=device), g)
    assert not torch.allclose(other, expected, rtol=1e-3)


def test_max_diagonal_monte_carlo_resumes_bit_exactly(device):
    def build(model):
        return LevenbergMarquardt(model, _mse_mean, damping=0.5, damping_matrix="max_diagonal", diagonal_samples=2,
                                  seed=3)

    def fresh():
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(device=device, dtype=F64)

    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(10, 2, generator=gen, dtype=F64).to(device),
                torch.randn(10, 2, generator=gen, dtype=F64).to(device)) for _ in range(4)]
    model = fresh()
    opt = build(model)
    for x, y in batches[:2]:
        _step(opt, model, x, y)
    ckpt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in batches[2:]:
        _step(opt, model, x, y)
    model2 = fresh()
    model2.load_state_dict(ckpt[0])
    opt2 = build(model2)
    opt2.load_state_dict(ckpt[1])
    for x, y in batches[2:]:
        _step(opt2, model2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert torch.equal(opt._get_vector("max_diagonal"), opt2._get_vector("max_diagonal"))


def test_damping_matrix_settings_are_validated():
    model = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="damping_matrix"):
        LevenbergMarquardt(model, _mse_mean, damping_matrix="diag")
    with pytest.raises(ValueError, match="diagonal_samples"):
        LevenbergMarquardt(model, _mse_mean, damping_matrix="max_diagonal", diagonal_samples=0)


# ------------------------------------------------------------------ mutation audit of optimizers/levenberg_marquardt.py
def _lm_settings(opt):
    return (opt.param_groups[0]["lr"], opt.momentum, opt.uphill, opt.uphill_power, opt.max_line_search, opt.max_cg_iters,
            opt.cg_tol, opt.weight_decay, opt.targets_are_inputs, opt.damping_matrix, opt.diagonal_samples,
            opt.diagonal_floor, opt.seed)


def test_lm_defaults_and_keywords():
    model = nn.Linear(2, 2).double()
    opt = LevenbergMarquardt(model, _mse_mean)
    assert _lm_settings(opt) == (1.0, False, False, 2.0, 5, 200, 1e-10, 0.0, False, "identity", None, 1e-6, 0)
    assert type(opt.damping) is DelayedGratification and opt.damping.damping == 1e-3
    policy = DelayedGratification(0.5)
    opt = LevenbergMarquardt(model, _mse_mean, 0.5, policy, momentum=1, uphill=1, uphill_power=3.0, max_line_search=0,
                             max_cg_iters=1, cg_tol=0.0, weight_decay=0.1, targets_are_inputs=True,
                             damping_matrix="max_diagonal", diagonal_samples=1, diagonal_floor=0.5, seed=0)
    assert _lm_settings(opt) == (0.5, True, True, 3.0, 0, 1, 0.0, 0.1, True, "max_diagonal", 1, 0.5, 0)
    assert opt.damping is policy
    opt = LevenbergMarquardt(model, _mse_mean, damping=2.0, diagonal_floor=0.0, seed=9, diagonal_samples=4)
    assert (opt.damping.damping, opt.diagonal_floor, opt.seed, opt.diagonal_samples) == (2.0, 0.0, 9, 4)


@pytest.mark.parametrize("kw, message", [
    ({"damping_matrix": "diag"}, "damping_matrix must be 'identity' or 'max_diagonal', got 'diag'"),
    ({"diagonal_samples": 0}, "diagonal_samples must be an integer >= 1, got 0"),
    ({"diagonal_floor": 1.5}, "diagonal_floor must be a finite number in [0.0, 1.0), got 1.5"),
    ({"diagonal_floor": -0.1}, "diagonal_floor must be a finite number in [0.0, 1.0), got -0.1"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"uphill_power": 0.0}, "uphill_power must be a finite number in (0.0, inf), got 0.0"),
    ({"max_line_search": -1}, "max_line_search must be an integer >= 0, got -1"),
    ({"max_cg_iters": 0}, "max_cg_iters must be an integer >= 1, got 0"),
    ({"cg_tol": -1.0}, "cg_tol must be a finite number in [0.0, inf), got -1.0"),
    ({"damping": 0.0}, "damping must be a finite number in (0.0, inf), got 0.0"),
])
def test_lm_validation_messages(kw, message):
    with pytest.raises(ValueError) as err:
        LevenbergMarquardt(nn.Linear(2, 2).double(), _mse_mean, **kw)
    assert str(err.value) == message
