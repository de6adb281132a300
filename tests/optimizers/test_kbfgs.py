"""K-BFGS / K-BFGS(L): pair definition, ordering (AS.4), second pass, conv, end-to-end training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvature.blocks import vec_c
from optimizers import KBFGS, KBFGSL, KFAC, CurvatureOptimizer, kbfgsl_block, kfac_block

D = torch.float64


def _net(device, dtype=D, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype).to(device)


def _loss(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _closure(opt, model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _batch_means(model, x, y):
    """Independent oracle: mean pre-activations and mean per-sample dℓ/dh for each Linear, by hand."""
    hs, out = [], x
    for layer in model:
        out = layer(out)
        if isinstance(layer, nn.Linear):
            out.retain_grad()
            hs.append(out)
    _loss(out, y).backward()
    n = x.shape[0]
    result = [(h.detach().mean(0), (n * h.grad).mean(0)) for h in hs]
    model.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_pairs_are_differences_of_batch_means_at_the_two_points(device, cls):
    model = _net(device)
    x = torch.randn(16, 5, dtype=D, device=device)
    y = torch.randn(16, 3, dtype=D, device=device)
    opt = cls(model, lr=0.2, damping=0.3, pair_decay=0.0)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    probe = copy.deepcopy(model)
    before = _batch_means(probe, x, y)
    opt.step(_closure(opt, model, x, y))
    after = _batch_means(copy.deepcopy(model), x, y)
    for (name, block), (h0, g0), (h1, g1) in zip(opt.blocks.items(), before, after):
        s, yv = block.g_factor.last_raw_pair
        torch.testing.assert_close(s, h1 - h0)
        torch.testing.assert_close(yv, g1 - g0)


def test_pair_ema_starts_at_zero_without_bias_correction(device):
    model = _net(device)
    x = torch.randn(16, 5, dtype=D, device=device)
    y = torch.randn(16, 3, dtype=D, device=device)
    opt = KBFGS(model, lr=0.2, damping=0.3)
    before = _batch_means(copy.deepcopy(model), x, y)
    opt.step(_closure(opt, model, x, y))
    after = _batch_means(copy.deepcopy(model), x, y)
    s, yv = opt.blocks["0"].g_factor.last_raw_pair
    torch.testing.assert_close(s, 0.1 * (after[0][0] - before[0][0]))
    torch.testing.assert_close(yv, 0.1 * (after[0][1] - before[0][1]))


def test_closure_runs_twice_and_second_pass_computes_no_weight_gradients(device):
    model = _net(device)
    x = torch.randn(8, 5, dtype=D, device=device)
    y = torch.randn(8, 3, dtype=D, device=device)
    opt = KBFGSL(model, lr=0.1, damping=0.3)
    calls, grads_in_second = [], []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model(x), y)
        loss.backward()
        grads_in_second.append([p.grad is not None for p in model.parameters()])
        return loss

    opt.step(closure)
    assert len(calls) == 2
    assert all(grads_in_second[0]) and not any(grads_in_second[1])
    assert all(p.requires_grad for p in model.parameters())


def test_step_uses_factors_from_earlier_batches_and_h_updates_follow(device):
    """The direction at step k uses H_a, H_g as they were before batch k's pairs were used."""
    model = _net(device)
    x = torch.randn(16, 5, dtype=D, device=device)
    y = torch.randn(16, 3, dtype=D, device=device)
    opt = KBFGS(model, lr=0.2, damping=0.3, momentum=0.0, weight_decay=0.0)
    for _ in range(3):
        opt.step(_closure(opt, model, x + 0.01, y))
    ops = {n: torch.kron(b.a_factor.to_dense(), b.g_factor.to_dense()) for n, b in opt.blocks.items()}
    olds = {n: s.adapter.weight_matrix().clone() for n, s in opt.slots.items()}
    grads = {}
    opt.register_step_hook(lambda info: grads.update(info.grads))
    opt.step(_closure(opt, model, x, y))
    for name, slot in opt.slots.items():
        delta = slot.adapter.weight_matrix() - olds[name]
        torch.testing.assert_close(vec_c(delta), -0.2 * ops[name] @ vec_c(grads[name]))
        new_op = torch.kron(opt.blocks[name].a_factor.to_dense(), opt.blocks[name].g_factor.to_dense())
        assert not torch.allclose(new_op, ops[name]), "the H updates of step k must happen after the step"


def _operator_at_step(opt, model, batch, lag_probe):
    """Run one step on ``batch`` and return the dense operators that precondition() used."""
    used = {}
    for name, block in opt.blocks.items():
        original = block.precondition

        def spy(grad, name=name, block=block, original=original):
            used[name] = block.to_dense().clone()
            return original(grad)

        block.precondition = spy
    opt.step(_closure(opt, model, *batch))
    for block in opt.blocks.values():
        del block.precondition
    return used


@pytest.mark.parametrize(
    "make,lag,independent",
    [
        (lambda m: KBFGS(m, lr=0.1, damping=0.3, lag_factors=True), True, True),
        (lambda m: KBFGSL(m, lr=0.1, damping=0.3, lag_factors=True), True, True),
        (lambda m: KFAC(m, lr=0.1, damping=0.3, lag_factors=True, inverse_update_freq=1), True, True),
        (lambda m: KFAC(m, lr=0.1, damping=0.3, inverse_update_freq=1), False, False),
    ],
    ids=["kbfgs-lagged", "kbfgsl-lagged", "kfac-lagged", "kfac-as-coded"],
)
def test_as4_swapping_batch_k_leaves_the_operator_unchanged(device, make, lag, independent):
    """E5a / P26: with lagged factors the operator applied at step k is identical for ξ_k and ξ'_k."""
    model = _net(device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 5, generator=gen, dtype=D).to(device), torch.randn(16, 3, generator=gen, dtype=D).to(device))
               for _ in range(5)]
    opt = make(model)
    for b in batches[:3]:
        opt.step(_closure(opt, model, *b))
    twin_model = copy.deepcopy(model)
    twin = make(twin_model)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    used_a = _operator_at_step(opt, model, batches[3], lag)
    used_b = _operator_at_step(twin, twin_model, batches[4], lag)
    same = all(torch.equal(used_a[n], used_b[n]) for n in used_a)
    assert same == independent


def test_conv2d_layers_and_mixed_composition_train(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 10)).to(D).to(device)
    x = torch.randn(32, 1, 8, 8, dtype=D, device=device)
    labels = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    for make in (lambda m: KBFGS(m, lr=0.1, damping=0.3),
                 lambda m: CurvatureOptimizer(m, 0.1, {nn.Linear: kbfgsl_block(), nn.Conv2d: kfac_block()}, damping=0.3)):
        net = copy.deepcopy(model)
        opt = make(net)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), labels)
            loss.backward()
            return loss

        losses = [float(opt.step(closure).detach()) for _ in range(60)]
        assert all(math.isfinite(v) for v in losses)
        assert losses[-1] < 0.7 * losses[0]
        assert opt.skipped_steps == 0


def _train(opt, model, batches, loss_fn, steps):
    losses = []
    for k in range(steps):
        xb, yb = batches[k % len(batches)]

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    return losses


def _assert_trains(losses, opt, ratio):
    assert all(math.isfinite(v) for v in losses), "a non-finite loss appeared"
    for p in opt.model.parameters():
        assert torch.isfinite(p).all()
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < ratio * first, (first, last)
    assert opt.skipped_steps == 0 and opt.counters["reverted_steps"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_300_steps_on_mnist_autoencoder(mnist_path, cls):
    from benchmarks.data.mnist import load_mnist

    images, _ = load_mnist(mnist_path, split="test")
    images = images[:2000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 64), nn.ReLU(),
                          nn.Linear(64, 784))

    def bce(logits, target):
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()

    opt = cls(model, lr=0.3, damping=0.3)
    batches = [(images[i : i + 200], images[i : i + 200]) for i in range(0, 2000, 200)]
    assert opt.warm_start(xb for xb, _ in batches) == 10  # the authors' full-pass warm start of A
    losses = _train(opt, model, batches, bce, 300)
    _assert_trains(losses, opt, 0.6)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_300_steps_on_a_generated_regression_problem(device, cls):
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(10, 4, generator=gen)
    x = torch.randn(1200, 10, generator=gen)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(1200, 4, generator=gen)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    opt = cls(model, lr=0.1, damping=0.3)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1200, 100)]
    losses = _train(opt, model, batches, _loss, 300)
    _assert_trains(losses, opt, 0.3)


# ------------------------------------------------------------------ the constructors (mutation audit of kbfgs.py)
from curvature.factors import BFGSFactor, LBFGSFactor, OneHotCountFactor  # noqa: E402
from optimizers.communicator import LocalCommunicator  # noqa: E402
from optimizers.recovery import Recovery  # noqa: E402


def _kbfgs_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2))


def _kbfgs_settings(opt):
    g, block = opt.param_groups[0], opt.slots["2"].block
    a, gf = block.a_factor, block.g_factor
    return {
        "lr": g["lr"], "damping": g["damping"], "momentum": g["momentum"], "weight_decay": g["weight_decay"],
        "fallback_lr": g["fallback_lr"], "fallback_betas": g["fallback_betas"], "fallback_eps": g["fallback_eps"],
        "a_decay": a.covariance.decay, "lambda_a": a.damping, "pair_decay": gf.pair_decay, "mu1": gf.damping.mu1,
        "mu2": gf.damping.mu2, "variant": gf.damping.variant, "approx": block.approx,
        "memory": gf.lbfgs.memory if isinstance(gf, LBFGSFactor) else None, "g_kind": type(gf).__name__,
        "curvature_update_freq": opt.curvature_update_freq, "inverse_update_freq": opt.inverse_update_freq,
        "fallback": opt.fallback, "loss_reduction": opt.loss_reduction, "lag_factors": opt.lag_factors,
        "seed": opt._generator.initial_seed(), "strict": opt.strict, "require_closure": opt.require_closure,
        "blocks": sorted(opt.slots), "recovery": opt.recovery,
        "embedding_a": type(opt.slots["0"].block.a_factor).__name__ if "0" in opt.slots else None,
        "embedding_decay": opt.slots["0"].block.a_factor.decay if "0" in opt.slots else None,
    }


@pytest.mark.parametrize("cls, g_kind, memory", [(KBFGS, "BFGSFactor", None), (KBFGSL, "LBFGSFactor", 100)])
def test_kbfgs_defaults_are_the_documented_ones(cls, g_kind, memory):
    """lr 0.3, λ 0.3, λ_A = μ2 = √λ, μ1 0.2, EMA 0.9 for A and the pairs, momentum 0.9, τ 1e-5, T_cov = T_inv = 1,
    the authors' interpolating damping, p = 100 for K-BFGS(L); embeddings get KFAC's one-hot block (EMA 0.9)."""
    got = _kbfgs_settings(cls(_kbfgs_model()))
    root = math.sqrt(0.3)
    assert got == {
        "lr": 0.3, "damping": 0.3, "momentum": 0.9, "weight_decay": 1e-5, "fallback_lr": None, "fallback_betas": None,
        "fallback_eps": 1e-8, "a_decay": 0.9, "lambda_a": root, "pair_decay": 0.9, "mu1": 0.2, "mu2": root,
        "variant": "interpolate", "approx": "expand", "memory": memory, "g_kind": g_kind,
        "curvature_update_freq": 1, "inverse_update_freq": 1, "fallback": "sgd", "loss_reduction": "mean",
        "lag_factors": False, "seed": 0, "strict": False, "require_closure": True, "blocks": ["0", "2", "4"],
        "recovery": Recovery(), "embedding_a": "OneHotCountFactor", "embedding_decay": 0.9,
    }
    assert _kbfgs_settings(cls(_kbfgs_model(), full_batch=True))["pair_decay"] == 0.0


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_every_kbfgs_keyword_reaches_the_optimizer(cls):
    recovery, comm = Recovery(step_shrink=0.5), LocalCommunicator()
    extra = {"memory": 7} if cls is KBFGSL else {}
    opt = cls(_kbfgs_model(), lr=0.2, damping=0.5, momentum=0.3, weight_decay=0.02, a_decay=0.8, pair_decay=0.7,
              mu1=0.1, mu2=0.6, lambda_a=0.4, damping_variant="lm", fallback="adam", fallback_lr=0.002,
              fallback_betas=(0.5, 0.9), fallback_eps=1e-6, loss_reduction="sum", lag_factors=True, approx="reduce",
              blocks={"4": None}, seed=7, recovery=recovery, strict=True, distributed=comm, distribute="layerwise",
              **extra)
    got = _kbfgs_settings(opt)
    assert got == {
        "lr": 0.2, "damping": 0.5, "momentum": 0.3, "weight_decay": 0.02, "fallback_lr": 0.002,
        "fallback_betas": (0.5, 0.9), "fallback_eps": 1e-6, "a_decay": 0.8, "lambda_a": 0.4, "pair_decay": 0.7,
        "mu1": 0.1, "mu2": 0.6, "variant": "lm", "approx": "reduce", "memory": 7 if cls is KBFGSL else None,
        "g_kind": "LBFGSFactor" if cls is KBFGSL else "BFGSFactor", "curvature_update_freq": 1,
        "inverse_update_freq": 1, "fallback": "adam", "loss_reduction": "sum", "lag_factors": True, "seed": 7,
        "strict": True, "require_closure": True, "blocks": ["0", "2"], "recovery": recovery,
        "embedding_a": "OneHotCountFactor", "embedding_decay": 0.8,
    }
    assert opt.recovery is recovery and opt.data_parallel.comm is comm and opt.data_parallel.distribute == "layerwise"
    only = cls(_kbfgs_model(), layer_types=(nn.Linear,), exclude=["4"],
               param_groups=None)
    assert sorted(only.slots) == ["2"]


@pytest.mark.parametrize("bad", [0, -1.0, True, "0.3", float("nan")])
def test_kbfgs_damping_is_validated(bad):
    with pytest.raises(ValueError, match=r"damping \(lambda\) must be a number > 0"):
        KBFGS(_kbfgs_model(), damping=bad)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_kbfgsl_memory_is_validated_and_kbfgs_takes_none(bad):
    with pytest.raises(ValueError, match="memory must be an integer >= 1"):
        KBFGSL(_kbfgs_model(), memory=bad)
    with pytest.raises(ValueError, match=r"for limited memory use KBFGSL\(model, memory=\.\.\.\)"):
        KBFGS(_kbfgs_model(), memory=5)


def test_kbfgsl_accepts_a_memory_of_one_pair():
    opt = KBFGSL(_kbfgs_model(), memory=1)
    assert opt.slots["2"].block.g_factor.lbfgs.memory == 1


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_kbfgs_param_groups_reach_the_optimizer_and_a_closure_is_always_required(cls):
    model = _kbfgs_model()
    opt = cls(model, param_groups=[{"params": list(model.parameters()), "lr": 0.05}])
    assert opt.param_groups[0]["lr"] == 0.05
    bare = cls(_kbfgs_model(), exclude=["*"])  # no K-BFGS block at all: still the documented step(closure)
    assert not bare.slots
    with pytest.raises(RuntimeError, match=r"needs step\(closure\)"):
        bare.step()
