"""Hessian-free optimization against dense float64 GGN oracles on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from curvature.damping import AdaptiveLM, Tikhonov
from curvature.krylov import truncated_cg
from curvature.products import make_functional
from optimizers.hessian_free import HessianFree
from tests.curvature.oracles import loop_gradients
from tests.optimizers.closures import loss_closure

F64 = torch.float64


def _problem(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(device=device, dtype=F64)
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=F64).to(device)
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(2)).to(device)
    return model, F.cross_entropy, x, y


def dense_ggn(model, loss_fn, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, g): G = J^T H_ell J with jacrev, g = grad f, both dense float64."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        return {n: piece.reshape(s) for n, piece, s in zip(names, torch.split(t, [s.numel() for s in shapes]), shapes)}

    def out(t):
        return functional_call(model, unflat(t), (x,))

    z = out(theta).detach()
    jac = jacrev(lambda t: out(t).reshape(-1))(theta)
    h_ell = jacrev(jacrev(lambda o: loss_fn(o.reshape(z.shape), y)))(z.reshape(-1))
    g = jacrev(lambda t: loss_fn(out(t), y))(theta)
    return jac.T @ h_ell @ jac, g




def test_step_equals_damped_gauss_newton_solve(device):
    model, loss_fn, x, y = _problem(device)
    lam = 0.1
    ggn, g = dense_ggn(model, loss_fn, x, y)
    expected = -torch.linalg.solve(ggn + lam * torch.eye(ggn.shape[0], dtype=F64, device=device), g)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = HessianFree(model, loss_fn, lr=1.0, damping=Tikhonov(lam), max_cg_iters=200, progress_eps=None,
                      cg_tol=1e-13, backtrack=False, line_search=False)
    opt.step(loss_closure(opt, model, loss_fn, x, y), targets=y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after - before, expected, rtol=1e-8, atol=1e-10)
    info = opt.last_step
    assert info.accepted and info.products == info.details["cg_iterations"] + 1
    # the warm start is the solution just found
    torch.testing.assert_close(opt._get_vector("cg_solution"), expected, rtol=1e-8, atol=1e-10)


def test_cg_on_damped_ggn_is_monotone_in_the_damped_norm(device):
    model, loss_fn, x, y = _problem(device)
    lam = 0.05
    ggn, g = dense_ggn(model, loss_fn, x, y)
    a = ggn + lam * torch.eye(ggn.shape[0], dtype=F64, device=device)
    x_star = torch.linalg.solve(a, -g)
    product = make_functional(model, loss_fn, x, y).prepared_product("ggn")
    errors = []
    truncated_cg(lambda v: product(v) + lam * v, -g, max_iters=30, progress_eps=None,
                 callback=lambda i, xi, r: errors.append(float(torch.sqrt((xi - x_star) @ a @ (xi - x_star)))))
    assert len(errors) >= 10
    assert all(e1 <= e0 * (1 + 1e-12) for e0, e1 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-3 * errors[0]


class Square(nn.Module):
    """z = w^2 (a scalar parameter): the GGN 4w^2 badly underestimates the curvature far from the data."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=F64))

    def forward(self, x):
        return (self.w**2) * x


def test_lm_rule_raises_after_bad_ratio_and_lowers_after_good_one(device):
    half_sse = lambda o, t: 0.5 * ((o - t) ** 2).sum()  # noqa: E731
    x = torch.ones(1, dtype=F64, device=device)
    y = torch.ones(1, dtype=F64, device=device)
    # bad: at w = 0.1 the Gauss-Newton step overshoots (rho < 1/4): lambda <- 3/2 lambda
    model = Square(0.1).to(device)
    opt = HessianFree(model, half_sse, damping=1e-4, progress_eps=None)
    assert isinstance(opt.damping, AdaptiveLM) and opt.damping.omega == pytest.approx(2 / 3)
    opt.step(loss_closure(opt, model, half_sse, x, y), targets=y)
    assert opt.last_step.reduction_ratio < 0.25
    assert math.isclose(opt.damping.damping, 1.5e-4)
    # good: a linear least-squares problem, the quadratic model is exact (rho = 1): lambda <- 2/3 lambda
    lin = nn.Linear(2, 1, bias=False).to(device=device, dtype=F64)
    xs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=F64, device=device)
    ys = torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64, device=device)
    opt2 = HessianFree(lin, half_sse, damping=1e-2, progress_eps=None)
    opt2.step(loss_closure(opt2, lin, half_sse, xs, ys), targets=ys)
    assert opt2.last_step.reduction_ratio == pytest.approx(1.0, rel=1e-6)
    assert math.isclose(opt2.damping.damping, 1e-2 * 2 / 3)


def test_backtracking_and_line_search_never_increase_the_batch_objective(device):
    model, loss_fn, x, y = _problem(device)
    opt = HessianFree(model, loss_fn, damping=1e-3, max_cg_iters=40)
    closure = loss_closure(opt, model, loss_fn, x, y)
    for _ in range(6):
        opt.step(closure, targets=y)
        info = opt.last_step
        if info.accepted:
            assert info.loss_after < info.loss  # Armijo with a descent direction implies a decrease
            assert info.details["backtracked_to"] <= info.details["cg_iterations"]
    assert opt.counters["steps"] == 6


# ------------------------------------------------------------------ Martens's diagonal preconditioner
def _per_example_oracle(model, loss_fn, x, y):
    """(1/N) sum_i g_i * g_i, one autograd backward per example."""
    return loop_gradients(model, loss_fn, x, y).pow(2).mean(0)


def test_martens_preconditioner_is_the_powered_damped_squared_gradient_diagonal(device):
    model, loss_fn, x, y = _problem(device)
    opt = HessianFree(model, loss_fn, damping=0.3, preconditioner="martens")
    m = opt.martens_preconditioner(make_functional(model, loss_fn, x, y), 0.3)
    torch.testing.assert_close(m, (_per_example_oracle(model, loss_fn, x, y) + 0.3) ** 0.75, rtol=1e-12, atol=1e-15)


def test_preconditioned_cg_still_solves_the_damped_system_exactly(device):
    model, loss_fn, x, y = _problem(device)
    lam = 0.1
    ggn, g = dense_ggn(model, loss_fn, x, y)
    expected = -torch.linalg.solve(ggn + lam * torch.eye(ggn.shape[0], dtype=F64, device=device), g)
    m_inv = ((_per_example_oracle(model, loss_fn, x, y) + lam) ** 0.75).reciprocal()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = HessianFree(model, loss_fn, lr=1.0, damping=Tikhonov(lam), max_cg_iters=200, progress_eps=None,
                      cg_tol=1e-13, backtrack=False, line_search=False, preconditioner="martens")
    seen = []
    opt.register_step_hook(lambda info: seen.append(info.cg_preconditioner.clone()))
    opt.step(loss_closure(opt, model, loss_fn, x, y), targets=y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after - before, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(seen[0], m_inv, rtol=1e-12, atol=0.0)
    assert opt.last_step.details["per_example_gradients"] == x.shape[0]


def test_preconditioner_settings_are_validated():
    model = nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="preconditioner must be"):
        HessianFree(model, F.mse_loss, preconditioner="jacobi")
    with pytest.raises(ValueError, match="preconditioner_exponent"):
        HessianFree(model, F.mse_loss, preconditioner="martens", preconditioner_exponent=0.0)


# ------------------------------------------------------------------ mutation audit of optimizers/hessian_free.py
def test_hessian_free_defaults_and_keywords():
    model = nn.Linear(2, 2).double()
    opt = HessianFree(model, F.mse_loss)
    got = (opt.curvature, opt.max_cg_iters, opt.cg_decay, opt.progress_eps, opt.cg_tol, opt.backtrack, opt.line_search,
           opt.armijo_c, opt.line_search_shrink, opt.max_line_search, opt.weight_decay, opt.targets_are_inputs,
           opt.preconditioner, opt.preconditioner_exponent, opt.param_groups[0]["lr"])
    assert got == ("ggn", 250, 0.95, 5e-4, 0.0, True, True, 1e-2, 0.8, 20, 0.0, False, None, 0.75, 1.0)
    assert type(opt.damping) is AdaptiveLM and opt.damping.damping == 1.0
    assert opt.damping.omega == 2.0 / 3.0 and opt.damping.use_pi is False
    policy = Tikhonov(0.2)
    opt = HessianFree(model, F.mse_loss, 0.5, policy, curvature="hessian", max_cg_iters=7, cg_decay=0.5,
                      progress_eps=None, cg_tol=1e-6, backtrack=0, line_search=0, armijo_c=0.3, line_search_shrink=0.5,
                      max_line_search=3, weight_decay=0.1, targets_are_inputs=True, preconditioner="martens",
                      preconditioner_exponent=1.0)
    got = (opt.curvature, opt.max_cg_iters, opt.cg_decay, opt.progress_eps, opt.cg_tol, opt.backtrack, opt.line_search,
           opt.armijo_c, opt.line_search_shrink, opt.max_line_search, opt.weight_decay, opt.targets_are_inputs,
           opt.preconditioner, opt.preconditioner_exponent, opt.param_groups[0]["lr"])
    assert got == ("hessian", 7, 0.5, None, 1e-6, False, False, 0.3, 0.5, 3, 0.1, True, "martens", 1.0, 0.5)
    assert opt.damping is policy
    edges = HessianFree(model, F.mse_loss, damping=3.0, max_cg_iters=1, cg_decay=1.0, max_line_search=1,
                        progress_eps=1e-12)
    assert (edges.max_cg_iters, edges.cg_decay, edges.max_line_search, edges.progress_eps) == (1, 1.0, 1, 1e-12)
    assert edges.damping.damping == 3.0 and HessianFree(model, F.mse_loss, cg_decay=0.0).cg_decay == 0.0


@pytest.mark.parametrize("kw, message", [
    ({"preconditioner": "jacobi"}, "preconditioner must be None or 'martens', got 'jacobi'"),
    ({"preconditioner_exponent": 0.0}, "preconditioner_exponent must be a finite number in (0.0, 1.0], got 0.0"),
    ({"preconditioner_exponent": 1.5}, "preconditioner_exponent must be a finite number in (0.0, 1.0], got 1.5"),
    ({"curvature": "fisher"}, "curvature must be 'ggn' or 'hessian', got 'fisher'"),
    ({"max_cg_iters": 0}, "max_cg_iters must be an integer >= 1, got 0"),
    ({"cg_decay": 1.5}, "cg_decay must be a finite number in [0.0, 1.0], got 1.5"),
    ({"cg_decay": -0.5}, "cg_decay must be a finite number in [0.0, 1.0], got -0.5"),
    ({"progress_eps": 0.0}, "progress_eps must be a finite number in (0.0, inf), got 0.0"),
    ({"cg_tol": -1.0}, "cg_tol must be a finite number in [0.0, inf), got -1.0"),
    ({"armijo_c": 1.0}, "armijo_c must be a finite number in (0.0, 1.0), got 1.0"),
    ({"armijo_c": 0.0}, "armijo_c must be a finite number in (0.0, 1.0), got 0.0"),
    ({"line_search_shrink": 1.0}, "line_search_shrink must be a finite number in (0.0, 1.0), got 1.0"),
    ({"line_search_shrink": 0.0}, "line_search_shrink must be a finite number in (0.0, 1.0), got 0.0"),
    ({"max_line_search": 0}, "max_line_search must be an integer >= 1, got 0"),
    ({"damping": 0.0}, "damping must be a finite number in (0.0, inf), got 0.0"),
])
def test_hessian_free_validation_messages(kw, message):
    with pytest.raises(ValueError) as err:
        HessianFree(nn.Linear(2, 2).double(), F.mse_loss, **kw)
    assert str(err.value) == message


def _square_setup(w0, **kw):
    """F(w) = ½(w² − 1)² (one sample x = y = 1): G = 4w², g = 2w(w² − 1); every CG solve is exact in 1-D."""
    half_sse = lambda o, t: 0.5 * ((o - t) ** 2).sum()  # noqa: E731
    model = Square(w0)
    x = torch.ones(1, dtype=F64)
    opt = HessianFree(model, half_sse, **kw)
    return model, opt, loss_closure(opt, model, half_sse, x, x), x


def _square_f(w):
    return 0.5 * (w * w - 1.0) ** 2


def test_reduction_ratio_and_step_on_the_square_model_by_hand():
    w, lam = 0.6, 0.3
    model, opt, closure, x = _square_setup(w, damping=Tikhonov(lam), line_search=False, backtrack=False, progress_eps=None)
    g, gn = 2 * w * (w * w - 1), 4 * w * w
    p = -g / (gn + lam)
    rho = (_square_f(w + p) - _square_f(w)) / (g * p + 0.5 * gn * p * p)
    opt.step(closure, targets=x)
    info = opt.last_step
    assert info.accepted and info.step_scale == 1.0 and info.loss_evals == 1
    assert float(model.w.detach()) == pytest.approx(w + p, rel=1e-13)
    assert info.reduction_ratio == pytest.approx(rho, rel=1e-10)
    assert info.loss_after == pytest.approx(_square_f(w + p), rel=1e-12)
    assert info.details["backtracked_to"] == info.details["cg_iterations"]  # backtrack off: the last iterate
    assert info.details["cg_warm_start"] is False


def test_lr_below_one_scales_the_step_with_one_more_evaluation():
    w, lam = 0.6, 0.3
    model, opt, closure, x = _square_setup(w, lr=0.5, damping=Tikhonov(lam), line_search=False, backtrack=False,
                                           progress_eps=None)
    p = -(2 * w * (w * w - 1)) / (4 * w * w + lam)
    opt.step(closure, targets=x)
    info = opt.last_step
    assert float(model.w.detach()) == pytest.approx(w + 0.5 * p, rel=1e-13)
    assert info.step_scale == 0.5 and info.loss_evals == 2
    assert info.loss_after == pytest.approx(_square_f(w + 0.5 * p), rel=1e-12)


def test_armijo_line_search_by_hand():
    """From w = 0.1 the Gauss–Newton step overshoots to w ≈ 5: α shrinks by 0.8 until
    F(w + αp) ≤ F(w) + c α g p, counted by hand; with too few tries the step is rejected."""
    w, lam, c, shrink = 0.1, 1e-4, 1e-2, 0.8
    g, gn = 2 * w * (w * w - 1), 4 * w * w
    p = -g / (gn + lam)
    alpha, tries = 1.0, 1
    while not _square_f(w + alpha * p) <= _square_f(w) + c * alpha * g * p:
        alpha *= shrink
        tries += 1
    assert tries >= 4
    model, opt, closure, x = _square_setup(w, damping=Tikhonov(lam), backtrack=False, progress_eps=None)
    opt.step(closure, targets=x)
    info = opt.last_step
    assert info.accepted and info.step_scale == pytest.approx(alpha, rel=1e-12)
    assert float(model.w.detach()) == pytest.approx(w + alpha * p, rel=1e-12)
    assert info.loss_evals == tries and info.loss_after == pytest.approx(_square_f(w + alpha * p), rel=1e-12)
    # one try fewer than needed: rejected, w unchanged
    model, opt, closure, x = _square_setup(w, damping=Tikhonov(lam), backtrack=False, progress_eps=None,
                                           max_line_search=tries - 1)
    opt.step(closure, targets=x)
    info = opt.last_step
    assert not info.accepted and info.details["reason"] == "no Armijo step found"
    assert float(model.w.detach()) == w and info.loss_evals == tries - 1 and opt.counters["rejected_steps"] == 1
    # exactly enough tries: accepted
    model, opt, closure, x = _square_setup(w, damping=Tikhonov(lam), backtrack=False, progress_eps=None,
                                           max_line_search=tries)
    opt.step(closure, targets=x)
    assert opt.last_step.accepted and opt.last_step.step_scale == pytest.approx(alpha, rel=1e-12)
    # a different Armijo constant and shrink factor, by hand again
    c2, shrink2 = 0.4, 0.5
    alpha2, tries2 = 1.0, 1
    while not _square_f(w + alpha2 * p) <= _square_f(w) + c2 * alpha2 * g * p:
        alpha2 *= shrink2
        tries2 += 1
    model, opt, closure, x = _square_setup(w, damping=Tikhonov(lam), backtrack=False, progress_eps=None, armijo_c=c2,
                                           line_search_shrink=shrink2)
    opt.step(closure, targets=x)
    assert opt.last_step.step_scale == alpha2 and opt.last_step.loss_evals == tries2


def test_warm_start_is_cg_decay_times_the_previous_solution():
    """Two steps with one CG iteration each on F = ½‖Xθ − y‖²: the second CG starts from ζ p₁, by hand."""
    half_sse = lambda o, t: 0.5 * ((o - t) ** 2).sum()  # noqa: E731
    xs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=F64)
    ys = torch.tensor([[1.0], [-1.0], [0.5]], dtype=F64)
    lam, zeta = 0.1, 0.6
    a = xs.T @ xs + lam * torch.eye(2, dtype=F64)

    def one_cg(theta, x0):
        g = xs.T @ (xs @ theta - ys[:, 0])
        x = torch.zeros(2, dtype=F64) if x0 is None else x0
        r = -g - a @ x
        return x + (r @ r) / (r @ a @ r) * r

    for decay in (zeta, 0.0):
        lin = nn.Linear(2, 1, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[0.3, -0.7]], dtype=F64))
        theta = lin.weight.detach()[0].clone()
        opt = HessianFree(lin, half_sse, damping=Tikhonov(lam), max_cg_iters=1, cg_decay=decay, progress_eps=None,
                          backtrack=False, line_search=False)
        closure = loss_closure(opt, lin, half_sse, xs, ys)
        p1 = one_cg(theta, None)
        opt.step(closure, targets=ys)
        assert opt.last_step.details["cg_warm_start"] is False
        torch.testing.assert_close(lin.weight.detach()[0], theta + p1, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(opt._get_vector("cg_solution"), p1, rtol=1e-13, atol=1e-15)
        p2 = one_cg(theta + p1, decay * p1 if decay > 0 else None)
        opt.step(closure, targets=ys)
        assert opt.last_step.details["cg_warm_start"] is (decay > 0)
        torch.testing.assert_close(lin.weight.detach()[0], theta + p1 + p2, rtol=1e-12, atol=1e-14)


def test_cg_backtracking_walks_back_while_the_objective_decreases():
    """The saved CG iterates of a dense solve (⌈1.3^j⌉), walked back from the last by hand with the
    batch loss; the step is the best one found before the first increase."""
    model, loss_fn, x, y = _problem("cpu")
    lam = 1e-4
    ggn, g = dense_ggn(model, loss_fn, x, y)
    a = ggn + lam * torch.eye(ggn.shape[0], dtype=F64)
    dense = truncated_cg(lambda v: a @ v, -g, max_iters=24, progress_eps=None, save_gamma=1.3)
    functional = make_functional(model, loss_fn, x, y)
    theta = functional.theta.clone()
    loss = lambda t: float(functional.loss_at(t))  # noqa: E731
    best_i, best_p = dense.saved[-1]
    best_f = loss(theta + best_p)
    walked = 1
    for i, p in reversed(dense.saved[:-1]):
        f = loss(theta + p)
        walked += 1
        if not f < best_f:
            break
        best_i, best_p, best_f = i, p, f
    assert (best_i, walked) == (5, 8)  # 24 → 18 → ... → 5, stopped by the rise at 4
    opt = HessianFree(model, loss_fn, damping=Tikhonov(lam), max_cg_iters=24, progress_eps=None, line_search=False)
    opt.step(loss_closure(opt, model, loss_fn, x, y), targets=y)
    info = opt.last_step
    assert info.details["backtracked_to"] == best_i and info.loss_evals == walked
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after, theta + best_p, rtol=1e-7, atol=1e-9)


def test_step_hooks_see_the_uncounted_ggn_and_the_damping_shift():
    model, loss_fn, x, y = _problem("cpu")
    lam, tau = 0.2, 0.01
    ggn, _ = dense_ggn(model, loss_fn, x, y)
    opt = HessianFree(model, loss_fn, damping=Tikhonov(lam), weight_decay=tau, max_cg_iters=3)
    seen = []
    v = torch.linspace(-1.0, 1.0, ggn.shape[0], dtype=F64)
    opt.register_step_hook(lambda info: seen.append((info.operator(v), info.operator_shift.clone(), info.products)))
    opt.step(loss_closure(opt, model, loss_fn, x, y), targets=y)
    cv, shift, products = seen[0]
    torch.testing.assert_close(cv, ggn @ v, rtol=1e-10, atol=1e-12)
    assert torch.equal(shift, torch.full_like(v, lam + tau)) and opt.last_step.products == products


def test_one_preconditioned_cg_iteration_by_hand():
    """max_cg_iters = 1 with Martens's preconditioner: x₁ = (rᵀz / zᵀAz) z with r = −g, z = M⁻¹r."""
    model, loss_fn, x, y = _problem("cpu")
    lam = 0.1
    ggn, g = dense_ggn(model, loss_fn, x, y)
    a = ggn + lam * torch.eye(ggn.shape[0], dtype=F64)
    m_inv = ((_per_example_oracle(model, loss_fn, x, y) + lam) ** 0.75).reciprocal()
    r = -g
    z = m_inv * r
    x1 = (r @ z) / (z @ a @ z) * z
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = HessianFree(model, loss_fn, damping=Tikhonov(lam), max_cg_iters=1, progress_eps=None, backtrack=False,
                      line_search=False, preconditioner="martens")
    opt.step(loss_closure(opt, model, loss_fn, x, y), targets=y)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(after - before, x1, rtol=1e-10, atol=1e-12)


def test_progress_stop_and_its_reason_are_those_of_cg_on_the_dense_system():
    model, loss_fn, x, y = _problem("cpu")
    lam = 1e-3
    ggn, g = dense_ggn(model, loss_fn, x, y)
    a = ggn + lam * torch.eye(ggn.shape[0], dtype=F64)
    dense = truncated_cg(lambda v: a @ v, -g, max_iters=60, progress_eps=0.05, save_gamma=None)
    assert dense.stop_reason == "progress" and dense.iterations < 60
    opt = HessianFree(model, loss_fn, damping=Tikhonov(lam), max_cg_iters=60, progress_eps=0.05, line_search=False)
    opt.step(loss_closure(opt, model, loss_fn, x, y), targets=y)
    d = opt.last_step.details
    assert (d["cg_iterations"], d["cg_stop"]) == (dense.iterations, "progress")


def test_a_non_finite_cg_solution_is_rejected_and_raises_the_damping():
    """A loss linear in the output has a zero GGN: with a subnormal λ the first CG step 1/(λ‖r‖²) overflows."""
    lin = nn.Linear(2, 1).double()
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=F64)
    linear_loss = lambda o, t: o.sum()  # noqa: E731
    opt = HessianFree(lin, linear_loss, damping=1e-320, targets_are_inputs=True)
    before = [p.detach().clone() for p in lin.parameters()]
    opt.step(loss_closure(opt, lin, linear_loss, x, x))
    info = opt.last_step
    assert not info.accepted and info.details["reason"] == "non-finite CG solution" and info.loss_evals == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(lin.parameters(), before))
    assert opt.damping.damping == 1e-8  # ρ = −inf raised λ, to AdaptiveLM's floor min_damping


def test_backtracking_stops_at_the_first_iterate_that_is_not_better():
    """1-D: every CG iterate after the first is the exact solution, so the walk back finds equal losses
    and keeps the last iterate."""
    model, opt, closure, x = _square_setup(0.6, damping=Tikhonov(0.3), line_search=False, progress_eps=None)
    opt.step(closure, targets=x)
    d = opt.last_step.details
    assert d["cg_iterations"] > 1 and d["backtracked_to"] == d["cg_iterations"] and opt.last_step.loss_evals == 2


def test_reduction_ratio_is_minus_inf_without_a_predicted_decrease_or_at_a_nan_loss():
    # negative curvature (curvature="hessian", F = −w², λ 1): CG stops at once, p = 0, q(p) − q(0) = 0
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.ones(1, 1, dtype=F64)
    concave = lambda o, t: -(o**2).sum()  # noqa: E731
    opt = HessianFree(lin, concave, damping=Tikhonov(1.0), curvature="hessian", line_search=False,
                      targets_are_inputs=True)
    opt.step(loss_closure(opt, lin, concave, x, x))
    assert opt.last_step.details["cg_stop"] == "negative_curvature"
    assert opt.last_step.reduction_ratio == float("-inf")
    # a NaN loss at the CG point (sqrt of a negative output): ρ = −inf, λ × 3/2
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    t = torch.full((1, 1), -3.0, dtype=F64)
    nan_below_zero = lambda o, tt: 0.5 * ((o - tt) ** 2).sum() + 0.0 * torch.sqrt(o).sum()  # noqa: E731
    opt = HessianFree(lin, nan_below_zero, damping=1e-3, progress_eps=None)
    opt.step(loss_closure(opt, lin, nan_below_zero, x, t), targets=t)
    assert opt.last_step.reduction_ratio == float("-inf") and opt.damping.damping == 1e-3 * 1.5
    # without the line search, a NaN or +inf objective at the new point rejects the step
    for bad in (lambda o, tt: 0.5 * ((o - tt) ** 2).sum() + 0.0 * torch.sqrt(o).sum(),
                lambda o, tt: 0.5 * ((o - tt) ** 2).sum() - torch.log(o.clamp(min=0.0)).sum() * 1e-30):
        lin = nn.Linear(1, 1, bias=False).double()
        with torch.no_grad():
            lin.weight.fill_(1.0)
        opt = HessianFree(lin, bad, damping=Tikhonov(1e-3), progress_eps=None, line_search=False, backtrack=False)
        opt.step(loss_closure(opt, lin, bad, x, t), targets=t)
        info = opt.last_step
        assert not info.accepted and info.details["reason"] == "non-finite objective at the new point"
        assert lin.weight.item() == 1.0


def _hand_armijo(w, lam, c, shrink, max_tries):
    """The Armijo loop of the module docstring on F(w) = ½(w² − 1)², by hand: (α, tries) or None."""
    g, gn = 2 * w * (w * w - 1), 4 * w * w
    p = -g / (gn + lam)
    f0, slope = _square_f(w), g * p
    alpha, tries = 1.0, 1
    while not _square_f(w + alpha * p) <= f0 + c * alpha * slope and tries < max_tries:
        alpha *= shrink
        tries += 1
    return (alpha, tries) if _square_f(w + alpha * p) <= f0 + c * alpha * slope else None


@pytest.mark.parametrize("w, lam, c, shrink, max_tries", [
    (0.1, 1e-3, 0.6, 0.8, 20), (0.1, 0.05, 0.6, 0.3, 3), (0.1, 0.05, 0.6, 0.3, 2), (0.3, 1e-3, 0.6, 0.8, 3),
])
def test_armijo_condition_against_the_hand_loop(w, lam, c, shrink, max_tries):
    expected = _hand_armijo(w, lam, c, shrink, max_tries)
    model, opt, closure, x = _square_setup(w, damping=Tikhonov(lam), backtrack=False, progress_eps=None, armijo_c=c,
                                           line_search_shrink=shrink, max_line_search=max_tries)
    opt.step(closure, targets=x)
    info = opt.last_step
    if expected is None:
        assert not info.accepted and info.details["reason"] == "no Armijo step found"
    else:
        assert info.accepted and (info.step_scale, info.loss_evals) == pytest.approx(expected, rel=1e-12)


def test_a_zero_step_passes_the_armijo_condition_at_once():
    """Negative curvature stops CG at p = 0: F(θ + αp) = F(θ) with slope 0 satisfies F ≤ F + 0 (≤, not <)
    on the first try."""
    lin = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
    x = torch.ones(1, 1, dtype=F64)
    concave = lambda o, t: -(o**2).sum()  # noqa: E731
    opt = HessianFree(lin, concave, damping=Tikhonov(1.0), curvature="hessian", targets_are_inputs=True)
    opt.step(loss_closure(opt, lin, concave, x, x))
    info = opt.last_step
    assert info.accepted and info.step_scale == 1.0 and info.loss_evals == 1 and lin.weight.item() == 1.0
