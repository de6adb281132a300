"""Recovery from factors that cannot be inverted even in float64 (curvature.inverter, curvature.factors).

Oracle: torch.linalg.inv of F + λI in float64. The planted faults are a damped factor that is
indefinite (F = −cI with c > λ), and a non-finite running statistic.
"""

from __future__ import annotations

import pytest
import torch

from curvature.factors import EMACovarianceFactor, HessianActionFactor
from curvature.inverter import BatchedInverter
from curvature.linalg import InversionError, InversionStats

D = torch.float64


def _spd(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n + 2, generator=g, dtype=D)
    return (x @ x.T / (n + 2)).to(device)


def _oracle(F, lam):
    return torch.linalg.inv(F.double() + lam * torch.eye(F.shape[0], dtype=D, device=F.device))


def _refresh(factor, lam, stats=None, strict=False):
    inverter = BatchedInverter(stats=stats, strict=strict)
    factor.request_inverse(inverter, lam)
    return inverter.run()


def test_failed_refresh_keeps_the_previous_inverse_and_raises_the_damping(device):
    lam = 0.1
    f = EMACovarianceFactor(4, 0.9, dtype=D, device=device)
    good = _spd(4, device)
    f.observe(good)
    stats = InversionStats()
    assert _refresh(f, lam, stats) == 1
    before = f.inverse.clone()
    torch.testing.assert_close(before, _oracle(good, lam))

    f.F.copy_(-3 * lam * torch.eye(4, dtype=D, device=device))  # F + λI = −2λI: not SPD in any precision
    assert _refresh(f, lam, stats) == 0
    assert torch.equal(f.inverse, before), "the previous inverse must be kept bit-identically"
    assert f.inversion_failures == 1 and stats.recovered == 1 and stats.failures == 1
    assert f.damping_boost == EMACovarianceFactor.BOOST

    f.F.copy_(good)  # the next refresh uses the raised damping, then it relaxes back
    assert _refresh(f, lam, stats) == 1
    torch.testing.assert_close(f.inverse, _oracle(good, lam * EMACovarianceFactor.BOOST))
    assert f.inverse_damping == pytest.approx(lam * EMACovarianceFactor.BOOST)
    assert f.damping_boost == pytest.approx(EMACovarianceFactor.BOOST * EMACovarianceFactor.RELAX)
    for _ in range(10):
        _refresh(f, lam, stats)
    assert f.damping_boost == 1.0
    torch.testing.assert_close(f.inverse, _oracle(good, lam))


def test_first_inversion_failing_is_retried_with_more_damping(device):
    lam = 0.1
    f = EMACovarianceFactor(3, 0.9, dtype=D, device=device)
    f.observe(-5 * lam * torch.eye(3, dtype=D, device=device))  # fails at λ, succeeds at 10λ
    stats = InversionStats()
    assert _refresh(f, lam, stats) == 1
    torch.testing.assert_close(f.inverse, _oracle(f.F, 10 * lam))
    assert f.inverse_damping == pytest.approx(10 * lam)
    assert f.inversion_failures == 1 and stats.recovered == 1


def test_non_finite_statistic_is_dropped_and_reinitialized(device):
    lam = 0.1
    f = EMACovarianceFactor(3, 0.9, dtype=D, device=device)
    good = _spd(3, device, seed=1)
    f.observe(good)
    _refresh(f, lam)
    before = f.inverse.clone()
    f.F[0, 1] = float("nan")
    assert _refresh(f, lam) == 0
    assert torch.equal(f.inverse, before)
    assert f.statistic_resets == 1 and not f.initialized
    other = _spd(3, device, seed=2)
    f.observe(other)  # the next batch re-initializes F (no NaN carried by the EMA)
    assert torch.equal(f.F, other)


def test_strict_raises_and_leaves_the_factor_unchanged(device):
    lam = 0.1
    f = EMACovarianceFactor(3, 0.9, dtype=D, device=device)
    f.observe(_spd(3, device))
    _refresh(f, lam)
    before = f.inverse.clone()
    f.F.copy_(-3 * lam * torch.eye(3, dtype=D, device=device))
    stats = InversionStats()
    with pytest.raises(InversionError, match="float64"):
        _refresh(f, lam, stats, strict=True)
    assert torch.equal(f.inverse, before) and f.inversion_failures == 0 and f.damping_boost == 1.0
    assert stats.failures == 1 and stats.recovered == 0


def test_request_without_a_handler_raises(device):
    inverter = BatchedInverter()
    inverter.request(-torch.eye(2, dtype=D, device=device), 0.1, lambda inv: None)
    with pytest.raises(InversionError, match="no recovery handler"):
        inverter.run()


def test_only_the_failed_entry_of_a_batch_is_recovered(device):
    """Factors of one size share a batched call; a bad one must not spoil the others."""
    lam = 0.2
    good = EMACovarianceFactor(3, 0.9, dtype=D, device=device)
    bad = EMACovarianceFactor(3, 0.9, dtype=D, device=device)
    for f in (good, bad):
        f.observe(_spd(3, device))
    inverter = BatchedInverter()
    for f in (good, bad):
        f.request_inverse(inverter, lam)
    inverter.run()
    bad_before = bad.inverse.clone()
    new = _spd(3, device, seed=5)
    good.F.copy_(new)
    bad.F.copy_(-3 * lam * torch.eye(3, dtype=D, device=device))
    inverter = BatchedInverter()
    for f in (good, bad):
        f.request_inverse(inverter, lam)
    assert inverter.run() == 1
    torch.testing.assert_close(good.inverse, _oracle(new, lam))
    assert torch.equal(bad.inverse, bad_before)
    assert good.inversion_failures == 0 and bad.inversion_failures == 1


def test_hessian_action_initial_inverse_recovers(device):
    lam_a = 0.3
    f = HessianActionFactor(3, lam_a, dtype=D, device=device)
    f.set_statistic(-2 * lam_a * torch.eye(3, dtype=D, device=device))  # A + λ_A I = −λ_A I
    _refresh(f, 0.0)
    torch.testing.assert_close(f.H, _oracle(f.statistic, 10 * lam_a))
    assert f.inversion_failures == 1


def test_give_up_when_no_damping_helps(device):
    """A handler that keeps asking for more damping on a matrix no damping fixes ends in an error."""
    inverter = BatchedInverter(max_retries=3)
    nan = torch.full((2, 2), float("nan"), dtype=D, device=device)
    asked = []
    inverter.request(nan, 0.1, lambda inv: None, lambda d: asked.append(d) or 10 * d)
    with pytest.raises(InversionError, match="retries"):
        inverter.run()
    assert len(asked) == 4


# ------------------------------------------------------------------------------ mutation-audit gaps
def test_inverter_serves_several_runs_and_uses_its_method(device, monkeypatch):
    """Requests after a run are served by the next run; an 'eigh' inverter factors with eigh."""
    calls = {"eigh": 0}
    eigh = torch.linalg.eigh

    def count(*a, **k):
        calls["eigh"] += 1
        return eigh(*a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", count)
    inv = BatchedInverter("eigh")
    got = []
    for lam in (1.0, 3.0):
        inv.request(torch.eye(2, dtype=torch.float64, device=device), lam, got.append)
        assert inv.run() == 1
    assert calls["eigh"] == 2
    torch.testing.assert_close(got[1].cpu(), torch.eye(2, dtype=torch.float64) / 4.0, rtol=1e-15, atol=0)


def test_non_finite_damping_in_a_run_is_counted_and_named(device):
    stats = InversionStats()
    inv = BatchedInverter(stats=stats)
    for _ in range(2):
        for lam in (float("nan"), 1.0):
            inv.request(torch.eye(3, dtype=torch.float64, device=device), lam, lambda t: None)
        with pytest.raises(InversionError, match=r"^the damping \[nan, 1\.0\] is not finite$"):
            inv.run()
    assert stats.failures == 4 and stats.failed_shapes == [(2, 3, 3), (2, 3, 3)]
    inv.request(torch.eye(3, dtype=torch.float64, device=device), float("inf"), lambda t: None)  # alone in its group
    with pytest.raises(InversionError, match=r"^the damping \[inf\] is not finite$"):
        inv.run()
    assert stats.failed_shapes[-1] == (1, 3, 3)


def test_recovery_counts_and_messages(device):
    """Every recovery is counted; a retry's inversion is counted in the same stats; the messages say
    what failed and whether a handler was missing; the default allows 8 retries."""
    bad = -torch.eye(2, dtype=torch.float64, device=device)  # F + λI is not PD for λ < 1
    stats = InversionStats()
    inv = BatchedInverter(stats=stats)
    got = []
    inv.request(bad, 0.5, got.append, on_failure=lambda lam: 3.0)   # retried with λ = 3: (2I)^-1
    inv.request(bad, 0.5, got.append, on_failure=lambda lam: None)  # keeps what it has
    inv.request(bad, 0.5, got.append, on_failure=lambda lam: 3.0)
    assert inv.run() == 2 and stats.recovered == 3
    assert stats.calls == 5  # three in the batch, two retries
    torch.testing.assert_close(got[0].cpu(), 0.5 * torch.eye(2, dtype=torch.float64), rtol=1e-15, atol=0)
    with pytest.raises(InversionError, match=r"^damped factor of size 2 \(damping 0\.5\) is not finite or not positive "
                                             r"definite even in float64; increase the damping$"):
        strict = BatchedInverter(strict=True)
        strict.request(bad, 0.5, got.append, on_failure=lambda lam: 3.0)
        strict.run()
    with pytest.raises(InversionError, match=r"increase the damping \(this request has no recovery handler\)$"):
        plain = BatchedInverter()
        plain.request(bad, 0.5, got.append)
        plain.run()
    tries = []
    default = BatchedInverter()
    assert default.max_retries == 8
    default.request(bad, 0.5, got.append, on_failure=lambda lam: tries.append(lam) or 0.25)  # never enough
    with pytest.raises(InversionError, match=r"could not be inverted even with damping 0\.25 after 8 retries"):
        default.run()
    assert len(tries) == 9
