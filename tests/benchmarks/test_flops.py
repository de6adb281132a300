"""The analytic FLOP floors (benchmarks/flops.py) against hand counts and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import (
    FlopConstants,
    LinearShape,
    MethodSpec,
    bfgs_inverse_update_flops,
    covariance_flops,
    damped_inverse_flops,
    floor_ratio,
    forward_flops,
    hessian_action_update_flops,
    input_grad_flops,
    kron_precondition_flops,
    lbfgs_append_flops,
    lbfgs_apply_flops,
    linear_shapes,
    mlp_shapes,
    step_floor,
    weight_grad_flops,
)
from benchmarks.models import PARAM_COUNTS, build_autoencoder
from benchmarks.throughput import prefill_lbfgs
from curvature.blocks import g_statistic
from curvature.lbfgs import CompactLBFGS
from optimizers import KBFGSL, KFAC

# A 2-layer MLP 3 -> 2 -> 4 with biases, batch 5. Layer 1 (first): d_in 3, d_out 2, d_a 4, 8 params;
# layer 2: d_in 2, d_out 4, d_a 3, 12 params; 20 parameters in all.
WIDTHS, BATCH = (3, 2, 4), 5
# forward: layer 1 2*5*3*2 + 5*2 = 70, layer 2 2*5*2*4 + 5*4 = 100; weight grads the same;
# input grads: layer 1 none (first layer), layer 2 2*5*2*4 = 80.  Sum: 70+70+100+100+80 = 420.
BASE = 420
HAND = {
    MethodSpec("sgdm"): BASE + 7 * 20,  # 560
    MethodSpec("adam"): BASE + 16 * 20,  # 740
    # stats: cov(4)=5*4*5=100, cov(2)=5*2*3=30, ema 3*(16+4)=60; cov(3)=60, cov(4)=100, ema 3*(9+16)=75 -> 425
    # inverse (Cholesky d^3): 64+8 + 27+64 = 163; precondition 2*2*4*6=96 + 2*4*3*7=168 = 264; update 140
    MethodSpec("kfac", 1, 1): BASE + 425 + 163 + 264 + 140,  # 1412
    MethodSpec("kfac", 2, 4): BASE + 425 / 2 + 163 / 4 + 264 + 140,  # 1077.25
    # + Monte-Carlo pass: forward + input grads = 70 + 100 + 80 = 250
    MethodSpec("kfac", 1, 1, fisher="mc"): BASE + 425 + 250 + 163 + 264 + 140,  # 1662
    MethodSpec("kfac", 1, 1, inverse_method="eigh"): BASE + 425 + 1630 + 264 + 140,  # 2879
    # A stats 100+48 + 60+27 = 235; second pass 250; H_a 10*(16+9) = 250; precondition 264;
    # H_g 8*(2^2 + 4^2) = 160; update 140
    MethodSpec("kbfgs"): BASE + 235 + 250 + 250 + 264 + 160 + 140,  # 1719
    # precondition: 2*2*16 + (8*3*2*4 + 4*9*4) = 64 + 336, 2*4*9 + (8*3*4*3 + 4*9*3) = 72 + 396 -> 868
    # H_g: apply to one column (8*3*2 + 36 = 84, 8*3*4 + 36 = 132) + append (6*3*2 = 36, 6*3*4 = 72) -> 324
    MethodSpec("kbfgsl", memory=3): BASE + 235 + 250 + 250 + 868 + 324 + 140,  # 2487
    # stats: 2*5*2*4 + 5*6 + 3*8 = 134, 2*5*4*3 + 5*7 + 3*12 = 191 -> 325; inverse 2*20; precondition 20
    MethodSpec("diagonal"): BASE + 325 + 40 + 20 + 140,  # 945
}


@pytest.mark.parametrize("spec", list(HAND), ids=lambda s: f"{s.kind}-{s.curvature_update_freq}-{s.inverse_update_freq}-{s.fisher}-{s.inverse_method}")
def test_step_floor_matches_hand_count(spec):
    assert step_floor(spec, mlp_shapes(WIDTHS), BATCH).total == pytest.approx(HAND[spec], rel=1e-12)


def test_floor_ratio_is_relative_to_sgdm():
    shapes = mlp_shapes(WIDTHS)
    assert floor_ratio(MethodSpec("sgdm"), shapes, BATCH) == 1.0
    assert floor_ratio(MethodSpec("kbfgs"), shapes, BATCH) == pytest.approx(1719 / 560)
    assert floor_ratio(MethodSpec("kbfgs"), shapes, BATCH, reference=MethodSpec("adam")) == pytest.approx(1719 / 740)


def test_per_layer_terms_by_hand():
    layer, first = LinearShape(3, 2), LinearShape(3, 2, needs_input_grad=False)
    assert forward_flops(layer, 4) == 2 * 4 * 3 * 2 + 4 * 2 == 56
    assert weight_grad_flops(layer, 4) == 56 and weight_grad_flops(LinearShape(3, 2, bias=False), 4) == 48
    assert input_grad_flops(layer, 4) == 48 and input_grad_flops(first, 4) == 0
    assert layer.d_a == 4 and layer.params == 8 and LinearShape(3, 2, bias=False).d_a == 3
    # 3x3 covariance of 4 rows: 6 distinct entries (one triangle), 4 multiply-adds each
    assert covariance_flops(3, 4) == 6 * 4 * 2
    # [2x2] @ [2x4] and [2x4] @ [4x4]
    assert kron_precondition_flops(2, 4) == 2 * 2 * 2 * 4 + 2 * 2 * 4 * 4 == 96
    assert damped_inverse_flops(10) == 1000 and damped_inverse_flops(10, "eigh") == 10_000
    assert damped_inverse_flops(10, constants=FlopConstants(cholesky_inverse=2.0)) == 2000
    assert bfgs_inverse_update_flops(3) == 2 * 9 + 4 * 9
    assert hessian_action_update_flops(3) == 3 * 2 * 9 + 4 * 9
    assert lbfgs_apply_flops(5, 7, 0) == 0 and lbfgs_append_flops(5, 3) == 90


def test_gemm_counts_agree_with_torch_flop_counter():
    lin = nn.Linear(3, 2)
    for needs_input_grad in (False, True):
        x = torch.randn(4, 3, requires_grad=needs_input_grad)
        with FlopCounterMode(display=False) as counter:
            lin(x).sum().backward()
        shape = LinearShape(3, 2, needs_input_grad=needs_input_grad)
        # the counter counts the GEMMs only, not the bias add or the bias gradient's column sum
        expected = forward_flops(shape, 4) + weight_grad_flops(shape, 4) + input_grad_flops(shape, 4) - 2 * 4 * 2
        assert counter.get_total_flops() == expected


def test_lbfgs_apply_count_agrees_with_the_library():
    lbfgs = CompactLBFGS(5, memory=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        s = torch.randn(5, generator=gen)
        lbfgs.append(s, s + 0.1 * torch.randn(5, generator=gen))
    with FlopCounterMode(display=False) as counter:
        lbfgs.apply(torch.randn(5, 7))
    # the counter sees the four thin GEMMs and (Y^T Y) X, not the two p x p triangular solves (p^2 n each)
    assert counter.get_total_flops() == lbfgs_apply_flops(5, 7, 3) - 2 * 3 * 3 * 7


def _tiny_closure(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - x).pow(2).sum(1).mean()
        loss.backward()
        return loss
    return closure


def test_library_preconditioning_does_the_floor_gemms(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)).to(device)
    x = torch.randn(8, 6, device=device)
    kfac = KFAC(model, lr=1e-3, damping=1.0)
    kfac.step(_tiny_closure(kfac, model, x))
    for name, block in kfac.blocks.items():
        grad = kfac.slots[name].adapter.grad_matrix()
        with FlopCounterMode(display=False) as counter:
            block.precondition(grad)
        assert counter.get_total_flops() == kron_precondition_flops(*block.shape)

    model2 = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 6)).to(device)
    kbfgsl = KBFGSL(model2, lr=1e-3, memory=3)
    prefill_lbfgs(kbfgsl)
    kbfgsl.step(_tiny_closure(kbfgsl, model2, x))
    for name, block in kbfgsl.blocks.items():
        d_o, d_a = block.shape
        p = block.g_factor.lbfgs.size
        assert p == 3
        grad = kbfgsl.slots[name].adapter.grad_matrix()
        with FlopCounterMode(display=False) as counter:
            block.precondition(grad)
        assert counter.get_total_flops() == 2 * d_o * d_a * d_a + lbfgs_apply_flops(d_o, d_a, p) - 2 * p * p * d_a


def test_library_statistic_gemm_is_twice_the_symmetric_floor(device):
    """The floor counts one triangle (syrk); ``rows.T @ rows`` computes both: 2·B·d² FLOPs.

    Measured on the G statistic (an out-of-place ``mm``); the A statistic is folded into the EMA by an
    in-place ``addmm_`` on the raw inputs, which the FLOP counter does not see, with the same 2·B·d_in² cost.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).to(device)
    kfac = KFAC(model, lr=1e-3)
    x = torch.randn(8, 6, device=device)
    kfac.capture.set(g=True)
    model(x).pow(2).sum().backward()
    record = kfac.capture.records["0"]
    with FlopCounterMode(display=False) as counter:
        g_statistic(record)
    d_g = 4
    assert counter.get_total_flops() == 2 * 8 * d_g * d_g
    assert covariance_flops(d_g, 8) == 8 * d_g * (d_g + 1) < counter.get_total_flops()


def test_mnist_shapes_and_forward_count():
    model = build_autoencoder("mnist", seed=0)
    shapes = linear_shapes(model)
    assert [s.needs_input_grad for s in shapes] == [False] + [True] * 7
    assert sum(s.params for s in shapes) == PARAM_COUNTS["mnist"]
    outputs = 1000 + 500 + 250 + 30 + 250 + 500 + 1000 + 784
    weights = PARAM_COUNTS["mnist"] - outputs
    assert sum(forward_flops(s, 1000) for s in shapes) == 2 * 1000 * weights + 1000 * outputs
    assert shapes == mlp_shapes((784, 1000, 500, 250, 30, 250, 500, 1000, 784))


def test_amortization_scales_with_frequencies():
    shapes = mlp_shapes(WIDTHS)
    every = step_floor(MethodSpec("kfac", 1, 1), shapes, BATCH).components
    lazy = step_floor(MethodSpec("kfac", 10, 100), shapes, BATCH).components
    assert lazy["inverse"] == pytest.approx(every["inverse"] / 100)
    assert lazy["statistics"] == pytest.approx(every["statistics"] / 10)
    assert lazy["precondition"] == every["precondition"]
    full = step_floor(MethodSpec("kbfgsl", memory=100), shapes, BATCH).total
    assert step_floor(MethodSpec("kbfgsl", memory=0), shapes, BATCH).total < full


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"kind": "newton"}, "kind"),
    ({"kind": "kfac", "curvature_update_freq": 0}, "curvature_update_freq"),
    ({"kind": "kfac", "inverse_update_freq": 1.5}, "inverse_update_freq"),
    ({"kind": "kfac", "fisher": "true"}, "fisher"),
    ({"kind": "kfac", "inverse_method": "lu"}, "inverse_method"),
    ({"kind": "kbfgsl"}, "memory"),
    ({"kind": "kbfgs", "memory": 5}, "memory"),
])
def test_method_spec_validation_names_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        MethodSpec(**kwargs)


def test_shape_and_model_validation():
    with pytest.raises(ValueError, match="d_in"):
        LinearShape(0, 3)
    with pytest.raises(ValueError, match="batch"):
        step_floor(MethodSpec("sgdm"), mlp_shapes(WIDTHS), 0)
    with pytest.raises(ValueError, match="not nn.Linear"):
        linear_shapes(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="cholesky_inverse"):
        FlopConstants(cholesky_inverse=-1.0)
