"""``convergence.check`` on a user-defined model: every check on an optimizer built from the blocks, the step-only
checks on a plain ``torch.optim`` optimizer (Adam baseline), a user ``DataLoader`` as the training loader, and the
Report's verdicts, summary and exit status."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import convergence
from convergence.harness import GradientTap
from convergence.monitor import iid_loader, theory_mode_kwargs
from convergence.results import Verdict
from optimizers import KBFGSL, KFAC


class TwoLayer(nn.Module):
    """A user's own model (not one of the harness's problems)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(3, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def _data(device, n=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(3, 2, generator=gen, dtype=torch.float64)) + 0.1 * torch.randn(n, 2, generator=gen,
                                                                                               dtype=torch.float64)
    return TensorDataset(x.to(device), y.to(device))


def _model(device):
    torch.manual_seed(0)
    return TwoLayer().double().to(device)


def _mse(z, t):
    return 0.5 * (z - t).pow(2).sum(1).mean()


def test_user_model_with_kfac_gets_every_check(device):
    report = convergence.check(_model(device), _mse, _data(device),
                               lambda m: KFAC(m, lr=0.05, damping=1.0, **theory_mode_kwargs()),
                               steps=12, batch_size=16, checks=["E1", "E3", "E4", "E5", "E7"], device=device,
                               checkpoints=1, descent_batches=8)
    ids = [r.check for r in report.results]
    assert ids[0] == "E0" and report["E0"].verdict is Verdict.PASS
    assert {"E1", "E3@11", "E4", "E4.apply", "E5a@11", "E5b@11", "E5c@11", "E7a", "E7b", "E7c", "E7d@11"} <= set(ids)
    assert report["E4"].verdict is Verdict.PASS and report["E4.apply"].verdict is Verdict.PASS
    assert report["E4"].evidence["checked"] > 0
    assert report["E5a@11"].verdict is Verdict.PASS
    assert report.summary["ERROR"] == 0
    assert report.exit_status == (1 if report.summary["FAIL"] else 0)
    assert "E4.apply" in report.table()


def test_adam_baseline_gets_the_step_only_checks(device):
    report = convergence.check(_model(device), _mse, _data(device),
                               lambda m: torch.optim.Adam(m.parameters(), lr=0.01), steps=12, batch_size=16,
                               checks=["E2", "E3", "E4", "E5", "E6", "E7"], device=device, checkpoints=1,
                               descent_batches=8)
    v = report.verdicts()
    for check in ("E4", "E4.apply", "E5a@11", "E7a", "E7d@11"):
        assert v[check] == "NOT_APPLICABLE", check
        assert "no curvature blocks" in report[check].reason
    assert v["E7c"] == "PASS" and v["E7b"] == "NOT_APPLICABLE"
    assert v["E6@11"] in ("PASS", "NOT_APPLICABLE") and report["E6@11"].evidence["form"] == "step"
    assert v["E3@11"] == "PASS" and v["E2"] in ("PASS", "INCONCLUSIVE")
    assert any("not built from the curvature blocks" in s for s in report.violations)


def test_a_user_loader_is_the_training_loader_and_its_batches_are_tested(device):
    data = _data(device)
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    report = convergence.check(_model(device), _mse, loader,
                               lambda m: KBFGSL(m, lr=0.05, damping=0.3, **theory_mode_kwargs()), steps=10,
                               checks=["E3", "E8"], device=device, checkpoints=1, rate_seeds=2)
    assert any("RandomSampler(replacement=False)" in s for s in report.violations)
    assert report["E8p"].verdict is Verdict.NOT_APPLICABLE
    e3 = report["E3@9"]
    assert "training batches of size 16" in e3.evidence["source"]


def test_gradient_tap_records_what_the_optimizer_received(device):
    """The tap's gradient equals the block layers' StepInfo.grads (step hook) and p.grad of the first closure call."""
    model = _model(device)
    data = _data(device)
    opt = KBFGSL(model, lr=0.05, damping=0.3, **theory_mode_kwargs())
    tap = GradientTap(model, opt)
    seen = {}
    opt.register_step_hook(lambda info: seen.setdefault(info.step, {k: v.clone() for k, v in info.grads.items()}))
    loader = iid_loader(data, 16, torch.Generator().manual_seed(0), num_samples=48)
    for k, (x, y) in enumerate(loader):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = _mse(model(x), y)
            loss.backward()
            return loss

        # the expected gradient, computed independently by autograd at the same point
        ref = torch.autograd.grad(_mse(model(x), y), list(model.parameters()))
        tap.begin(k)
        opt.step(tap.wrap(closure))
        flat = torch.cat([g.reshape(-1) for g in ref]).double()
        torch.testing.assert_close(tap.gradients[k], flat, rtol=1e-12, atol=1e-14)
    tap.detach()
    assert tap.hooked and sorted(tap.gradients) == [0, 1, 2]


def test_invalid_inputs_are_rejected(device):
    with pytest.raises(Exception, match="batch_size"):
        convergence.check(_model(device), _mse, _data(device), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                          steps=3)
    with pytest.raises(ValueError, match="unknown check"):
        convergence.check(_model(device), _mse, _data(device), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                          steps=3, batch_size=4, checks=["E9"])
