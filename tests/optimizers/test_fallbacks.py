"""Graceful fallback at construction, overrides (blocks=, exclude=) and describe()."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from curvature.adapters import UnsupportedLayerError
from optimizers import KBFGS, KFAC
from optimizers.recipes import diagonal_block

D = torch.float64


class ScaledLinear(nn.Linear):
    """A Linear subclass with an extra parameter the Linear adapter does not know."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__(n, m)
        self.scale = nn.Parameter(torch.ones(m))

    def forward(self, x):
        return super().forward(x) * self.scale


class Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.T) / 2


def _rows(opt):
    return {line.split()[0]: line for line in opt.describe().splitlines()[1:]}


def _total_listed(opt):
    return sum(int(line.split()[-1]) for line in opt.describe().splitlines()[1:])


def _step(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss
    return opt.step(closure)


@pytest.mark.parametrize("make", [KFAC, KBFGS])
def test_unusual_layers_fall_back_with_reasons_and_train(device, make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4),
                          nn.Conv1d(1, 2, 3, padding_mode="circular", padding=1), nn.Flatten(), nn.Linear(8, 2))
    nn.utils.parametrizations.weight_norm(model[2])
    parametrize.register_parametrization(model[3], "weight", Symmetric())
    model = model[:4].to(D).to(device)
    opt = make(model, lr=0.05, damping=0.3)
    rows = _rows(opt)
    assert "kfac" in rows["0"] or "kbfgs" in rows["0"]
    assert "fallback" in rows["1"] and "['scale']" in rows["1"]
    assert "fallback" in rows["2.parametrizations.weight"] or "fallback" in rows["2"]
    assert all("kfac" not in line and "kbfgs" not in line for name, line in rows.items() if name.startswith(("2", "3"))), \
        "a parametrized layer must not claim a curvature block"
    assert any("parametrized" in line for line in rows.values())
    assert _total_listed(opt) == sum(p.numel() for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(opt, model, torch.randn(5, 4, dtype=D, device=device))
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"parameter {n} was not updated"


def test_grouped_convolution_gets_per_group_blocks_and_circular_falls_back():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular"))
    rows = _rows(KFAC(model))
    assert "per group (2 groups)" in rows["0"] and "circular" in rows["1"]
    with pytest.raises(UnsupportedLayerError, match="circular"):
        KFAC(model, fallback="error")


def test_lazy_linear_asks_for_one_forward_then_works(device):
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2)).to(D).to(device)
    with pytest.raises(ValueError, match="run one forward"):
        KFAC(model)
    x = torch.randn(4, 5, dtype=D, device=device)
    model(x)
    opt = KFAC(model, lr=0.1)
    assert "kfac" in _rows(opt)["0"]
    _step(opt, model, x)


def test_blocks_overrides_and_exclude_patterns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 6))
    opt = KFAC(model, blocks={"3": None, nn.Embedding: diagonal_block(source="gradient", power=0.5)}, exclude=["1*"])
    rows = _rows(opt)
    assert "diagonal[gradient" in rows["0"] and "kfac" in rows["2"]
    assert "blocks maps it to None" in rows["3"] and "excluded" in rows["1"]
    assert "excluded" in _rows(KFAC(model, exclude=["?"]))["2"]
    with pytest.raises(TypeError, match="exclude"):
        KFAC(model, exclude="2")


def test_layer_types_limits_the_defaults():
    model = nn.Sequential(nn.Embedding(6, 4), nn.LayerNorm(4), nn.Linear(4, 6))
    rows = _rows(KFAC(model, layer_types=(nn.Linear,)))
    assert "no block for this layer type" in rows["0"] and "no block for this layer type" in rows["1"]
    assert "kfac" in rows["2"]
