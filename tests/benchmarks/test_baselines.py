"""The first-order baselines against hand-written float64 updates (spec §6, authors' code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.baselines import Adam, AdamConfig, RMSprop, RMSpropConfig, SGDMomentum, SGDMomentumConfig

STEPS = 6
TAU = 0.05  # large, so that a missing or misplaced L2 term is visible


def _problem(device, dtype=torch.float64, seed=0):
    """Parameters (a weight and a bias) and a smooth non-quadratic loss with θ-dependent gradients."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    xs = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(STEPS + 3)]
    params = [w.to(device, dtype).requires_grad_(), b.to(device, dtype).requires_grad_()]
    return params, [x.to(device, dtype) for x in xs]


def _loss(params, x):
    w, b = params
    return torch.tanh(x @ w.T + b).pow(2).sum() + 0.1 * (x @ w.T).pow(3).mean()


def _closure(opt, params, x):
    def closure():
        opt.zero_grad()
        loss = _loss(params, x)
        loss.backward()
        return loss
    return closure


def _grads_np(theta, x):
    """Gradients of the loss at numpy parameters θ (float64 autograd; the oracle's own copy)."""
    ps = [torch.tensor(t, dtype=torch.float64, requires_grad=True) for t in theta]
    _loss(ps, torch.as_tensor(x.cpu().numpy(), dtype=torch.float64)).backward()
    return [p.grad.numpy() for p in ps]


def _run(opt, params, xs, steps=STEPS):
    for k in range(steps):
        opt.step(_closure(opt, params, xs[k]))
    return [p.detach().cpu().double().numpy() for p in params]


def _theta0(params):
    return [p.detach().cpu().double().numpy().copy() for p in params]


# ------------------------------------------------------------------ oracles (float64, numpy)

def oracle_sgdm(theta, xs, lr, mu, tau, steps=STEPS):
    m = [np.zeros_like(t) for t in theta]
    for k in range(steps):
        g = _grads_np(theta, xs[k])
        for i in range(len(theta)):
            m[i] = mu * m[i] + (1 - mu) * (g[i] + tau * theta[i])
            theta[i] = theta[i] - lr * m[i]
    return theta


def oracle_adam(theta, xs, lr, mu, beta2, eps, tau, square="momentum", steps=STEPS):
    m = [np.zeros_like(t) for t in theta]
    v = [np.zeros_like(t) for t in theta]
    for k in range(1, steps + 1):
        g = _grads_np(theta, xs[k - 1])
        for i in range(len(theta)):
            gt = g[i] + tau * theta[i]
            m[i] = mu * m[i] + (1 - mu) * gt
            m_hat = m[i] / (1 - mu**k)
            q = m_hat if square == "momentum" else gt
            v[i] = beta2 * v[i] + (1 - beta2) * q * q
            v_hat = v[i] / (1 - beta2**k)
            theta[i] = theta[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def oracle_rmsprop(theta, xs, warm, lr, mu, beta2, eps, tau, steps=STEPS):
    """``warm`` are the minibatches of the warm-start pass (v0 = mean of squared L2'd gradients)."""
    v = [np.zeros_like(t) for t in theta]
    for x in warm:
        g = _grads_np(theta, x)
        for i in range(len(theta)):
            v[i] += (g[i] + tau * theta[i]) ** 2 / len(warm)
    m = [np.zeros_like(t) for t in theta]
    for k in range(steps):
        g = _grads_np(theta, xs[k])
        for i in range(len(theta)):
            m[i] = mu * m[i] + (1 - mu) * (g[i] + tau * theta[i])
            v[i] = beta2 * v[i] + (1 - beta2) * m[i] * m[i]
            theta[i] = theta[i] - lr * m[i] / (np.sqrt(v[i]) + eps)
    return theta


def _assert_close(got, want, rtol=1e-10, atol=1e-12):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# ------------------------------------------------------------------ tests


def test_sgd_momentum_matches_oracle(device):
    params, xs = _problem(device)
    want = oracle_sgdm(_theta0(params), xs, lr=0.05, mu=0.9, tau=TAU)
    got = _run(SGDMomentum(params, lr=0.05, weight_decay=TAU), params, xs)
    _assert_close(got, want)


def test_adam_matches_authors_update(device):
    params, xs = _problem(device)
    want = oracle_adam(_theta0(params), xs, lr=0.01, mu=0.9, beta2=0.9, eps=1e-4, tau=TAU)
    got = _run(Adam(params, lr=0.01, weight_decay=TAU), params, xs)
    _assert_close(got, want)
    # the textbook variant is a different algorithm on this problem
    other = oracle_adam(_theta0(_problem(device)[0]), xs, lr=0.01, mu=0.9, beta2=0.9, eps=1e-4, tau=TAU,
                        square="gradient")
    assert max(np.abs(a - b).max() for a, b in zip(got, other)) > 1e-4


def test_adam_defaults_are_the_authors():
    cfg = Adam([torch.zeros(1, requires_grad=True)]).config()
    assert (cfg.momentum, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.second_moment_of) == (
        0.9, 0.9, 1e-4, 1e-5, "momentum")
    cfg = RMSprop([torch.zeros(1, requires_grad=True)]).config()
    assert (cfg.momentum, cfg.beta2, cfg.eps, cfg.weight_decay) == (0.9, 0.9, 1e-4, 1e-5)


def test_adam_first_step_is_normalised_by_bias_corrections(device):
    """Step 1: m̂ = g̃ and v̂ = g̃², so Δθ = −α g̃ / (|g̃| + ε) for any μ, β2."""
    params, xs = _problem(device)
    theta = _theta0(params)
    g = _grads_np(theta, xs[0])
    got = _run(Adam(params, lr=0.1, momentum=0.7, beta2=0.5, eps=1e-3, weight_decay=TAU), params, xs, steps=1)
    for t, gi, p in zip(theta, g, got):
        gt = gi + TAU * t
        np.testing.assert_allclose(p, t - 0.1 * gt / (np.abs(gt) + 1e-3), rtol=1e-12, atol=1e-14)


def test_adam_gradient_variant_is_torch_adam(device):
    params, xs = _problem(device)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    got = _run(Adam(params, lr=0.01, eps=1e-4, weight_decay=TAU, second_moment_of="gradient"), params, xs)
    ref = _run(torch.optim.Adam(ref_params, lr=0.01, betas=(0.9, 0.9), eps=1e-4, weight_decay=TAU), ref_params, xs)
    _assert_close(got, ref)


def test_rmsprop_warm_start_and_steps_match_oracle(device):
    params, xs = _problem(device)
    warm = xs[STEPS:STEPS + 3]
    want = oracle_rmsprop(_theta0(params), xs, warm, lr=0.01, mu=0.9, beta2=0.9, eps=1e-4, tau=TAU)
    opt = RMSprop(params, lr=0.01, weight_decay=TAU)
    before = _theta0(params)
    assert opt.warm_start(_closure(opt, params, x) for x in warm) == 3
    _assert_close(_theta0(params), before, rtol=0, atol=0)  # the warm start does not move θ
    got = _run(opt, params, xs)
    _assert_close(got, want)


def test_rmsprop_gradient_variant_without_momentum_is_torch_rmsprop(device):
    params, xs = _problem(device)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    got = _run(RMSprop(params, lr=0.01, momentum=0.0, weight_decay=TAU, second_moment_of="gradient"), params, xs)
    ref = _run(torch.optim.RMSprop(ref_params, lr=0.01, alpha=0.9, eps=1e-4, weight_decay=TAU), ref_params, xs)
    _assert_close(got, ref)


def test_float32_matches_float64_oracle(device):
    params, xs = _problem(device, dtype=torch.float32)
    want = oracle_adam(_theta0(params), [x.double() for x in xs], lr=0.01, mu=0.9, beta2=0.9, eps=1e-4, tau=TAU)
    got = _run(Adam(params, lr=0.01, weight_decay=TAU), params, xs)
    _assert_close(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("cls", [SGDMomentum, Adam, RMSprop])
def test_state_dict_resume_is_exact(cls, device):
    params, xs = _problem(device)
    full = _run(cls(params, lr=0.01, weight_decay=TAU), params, xs)

    params, xs = _problem(device)
    opt = cls(params, lr=0.01, weight_decay=TAU)
    _run(opt, params, xs, steps=3)
    state = opt.state_dict()
    saved = [p.detach().clone() for p in params]
    params2 = [s.clone().requires_grad_() for s in saved]
    opt2 = cls(params2, lr=0.5, weight_decay=TAU)  # lr is restored from the state dict
    opt2.load_state_dict(state)
    for k in range(3, STEPS):
        opt2.step(_closure(opt2, params2, xs[k]))
    _assert_close([p.detach().cpu().numpy() for p in params2], full, rtol=0, atol=0)


def test_param_groups_have_their_own_hyperparameters(device):
    params, xs = _problem(device)
    theta = _theta0(params)
    g = _grads_np(theta, xs[0])
    opt = SGDMomentum([{"params": [params[0]]}, {"params": [params[1]], "lr": 1e-3, "momentum": 0.5}],
                      lr=0.05, weight_decay=TAU)
    opt.step(_closure(opt, params, xs[0]))
    # first step: m = (1 − μ) g̃, Δθ = −α (1 − μ) g̃ with each group's α and μ
    for p, t, gi, lr, mu in zip(params, theta, g, (0.05, 1e-3), (0.9, 0.5)):
        want = t - lr * (1 - mu) * (gi + TAU * t)
        np.testing.assert_allclose(p.detach().cpu().numpy(), want, rtol=1e-12, atol=1e-14)
    assert opt.config(1).momentum == 0.5
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (SGDMomentumConfig, {"lr": 0.0}, "lr"),
        (SGDMomentumConfig, {"lr": float("nan")}, "lr"),
        (SGDMomentumConfig, {"momentum": 1.0}, "momentum"),
        (SGDMomentumConfig, {"weight_decay": -1e-5}, "weight_decay"),
        (SGDMomentumConfig, {"lr": True}, "lr"),
        (AdamConfig, {"beta2": 1.0}, "beta2"),
        (AdamConfig, {"eps": 0.0}, "eps"),
        (RMSpropConfig, {"second_moment_of": "param"}, "second_moment_of"),
    ],
)
def test_config_validation_names_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_optimizer_constructors_validate():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="eps"):
        Adam(p, eps=-1.0)
    with pytest.raises(ValueError, match="beta2"):
        RMSprop(p, beta2=2.0)
    with pytest.raises(ValueError, match="momentum"):
        SGDMomentum(p, momentum=-0.1)


def test_rmsprop_warm_start_misuse(device):
    params, xs = _problem(device)
    opt = RMSprop(params, lr=0.01)
    with pytest.raises(ValueError, match="no minibatches"):
        opt.warm_start([])
    opt.step(_closure(opt, params, xs[0]))
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.warm_start([_closure(opt, params, xs[1])])
