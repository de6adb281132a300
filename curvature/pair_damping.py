r"""Damping of secant pairs for quasi-Newton factors: Powell (B- and H-form) and double damping.

**Powell, B-form** (Nocedal & Wright, Procedure 18.2), threshold :math:`\mu\in(0,1)`: if
:math:`s^\top y < \mu\, s^\top B s` then :math:`\theta = (1-\mu)s^\top Bs/(s^\top Bs - s^\top y)` and
:math:`r = \theta y + (1-\theta) Bs`, else :math:`r = y`. Guarantees :math:`s^\top r \ge \mu s^\top Bs`.

**Powell, H-form** (K-BFGS double damping, step 1): the same with :math:`s \leftrightarrow y` and
:math:`B \leftrightarrow H`: if :math:`s^\top y < \mu_1 y^\top H y` then
:math:`\theta_1 = (1-\mu_1) y^\top Hy/(y^\top Hy - s^\top y)` and :math:`\tilde s = \theta_1 s + (1-\theta_1) Hy`.
Guarantees :math:`\tilde s^\top y \ge \mu_1 y^\top Hy` (equality when active).

**Double damping** (Goldfarb, Ren & Bahamou 2020): step 1 as above, then step 2 either

* ``"interpolate"`` (the authors' code, default): Powell with :math:`B = I` and :math:`\mu_2`: if
  :math:`\tilde s^\top y < \mu_2\|\tilde s\|^2`, :math:`\theta_2 = (1-\mu_2)\|\tilde s\|^2/(\|\tilde s\|^2 - \tilde s^\top y)`
  and :math:`\tilde y = \theta_2 y + (1-\theta_2)\tilde s`;
* ``"lm"`` (the additive form found in asdl): :math:`\tilde y = y + \mu_2 \tilde s`.

Lemma DD (spec/theory.md §2.4): :math:`\tilde s^\top\tilde y \ge \mu_2\|\tilde s\|^2` and
:math:`\tilde y^\top H\tilde y \le (1/\mu_1 + \mu_2\lambda_{\max}(H))\,\tilde s^\top\tilde y`.

Guards the reference code lacks: a zero pair, or a damped :math:`\tilde s` below ``min_norm``, or
any non-finite quantity, makes the pair *skipped* (returned with ``skip_reason`` and counted); if
:math:`\mu_2 \ge 1` makes step 2's denominator vanish, the pair is shifted along :math:`\tilde s` to
meet invariant (i) with equality instead of dividing by zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from curvature.linalg import all_finite, read_scalars, sums_finite
from curvature.rows import column, padded, row_dot, split_rows

Step2Variant = Literal["interpolate", "lm"]


def powell_b_damping(s: torch.Tensor, y: torch.Tensor, Bs: torch.Tensor, mu: float = 0.2):
    """Powell's damping of ``y`` against ``B`` (B-form). Returns ``(r, theta, active)``."""
    sBs = torch.dot(s, Bs)
    sy = torch.dot(s, y)
    if sy < mu * sBs:
        theta = (1.0 - mu) * sBs / (sBs - sy)
        return theta * y + (1.0 - theta) * Bs, float(theta), True
    return y, 1.0, False


def _powell_h(s: torch.Tensor, y: torch.Tensor, Hy: torch.Tensor, mu1: float, sign: int):
    """:func:`powell_h_damping` on the device, without a host synchronization: ``(s_tilde, theta1, active)``
    with ``theta1`` and ``active`` tensors (``theta1`` is meaningless when not active). Vectors give 0-dim
    ``theta1`` and ``active``; padded rows (:mod:`curvature.rows`) give one of each per row."""
    yHy = row_dot(y, Hy)
    sy = row_dot(s, y)
    active = sy < mu1 * yHy
    theta = (1.0 - mu1) * yHy / (yHy - sy)
    return torch.where(column(active), column(theta) * s + sign * column(1.0 - theta) * Hy, s), theta, active


def powell_h_damping(s: torch.Tensor, y: torch.Tensor, Hy: torch.Tensor, mu1: float = 0.2, sign: int = 1):
    """Powell's damping of ``s`` against ``H`` (H-form, DD step 1). Returns ``(s_tilde, theta1, active)``.

    ``sign=-1`` reproduces a known sign bug of another library (θs − (1−θ)Hy); it exists only so the
    convergence harness can show that its checks catch that bug. Never use it for training.
    """
    s1, theta, active = _powell_h(s, y, Hy, mu1, sign)
    if bool(active):
        return s1, float(theta), True
    return s, 1.0, False


@dataclass
class DampingCounters:
    """How often each damping step fired, and how many pairs were skipped (per factor)."""

    pairs: int = 0
    step1: int = 0
    step2: int = 0
    step2_guard: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {"pairs": self.pairs, "step1": self.step1, "step2": self.step2,
                "step2_guard": self.step2_guard, "skipped": self.skipped,
                "skip_reasons": dict(self.skip_reasons)}


@dataclass(frozen=True)
class DampedPair:
    """The result of damping one pair: the damped (s̃, ỹ), the θ's, which steps fired, or a skip reason."""

    s: torch.Tensor
    y: torch.Tensor
    theta1: float = 1.0
    theta2: float = 1.0
    step1_active: bool = False
    step2_active: bool = False
    skip_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None


@dataclass
class DoubleDamping:
    """Double damping policy (Powell on H with μ1, then Powell with B = I, or LM, with μ2).

    Args:
        mu1: Powell threshold of step 1, in (0, 1); the reference code hard-codes 0.2.
        mu2: threshold of step 2, > 0; the reference code uses sqrt(λ) (may exceed 1 when λ > 1).
        variant: ``"interpolate"`` (authors' code, default) or ``"lm"`` (ỹ = y + μ2 s̃).
        min_norm: pairs whose damped ‖s̃‖ or whose ‖s‖ and ‖y‖ both fall below this are skipped.
        powell_sign: +1 (correct). -1 reproduces another library's sign bug for negative controls.
    """

    mu1: float = 0.2
    mu2: float = 0.5
    variant: Step2Variant = "interpolate"
    min_norm: float = 1e-30
    powell_sign: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.mu1 < 1.0:
            raise ValueError(f"mu1 must be in (0, 1), got {self.mu1}")
        if not self.mu2 > 0.0:
            raise ValueError(f"mu2 must be > 0, got {self.mu2}")
        if self.variant not in ("interpolate", "lm"):
            raise ValueError(f"variant must be 'interpolate' or 'lm', got {self.variant!r}")
        if self.powell_sign not in (1, -1):
            raise ValueError(f"powell_sign must be +1 or -1, got {self.powell_sign}")

    def __call__(
        self,
        s: torch.Tensor,
        y: torch.Tensor,
        apply_H: Callable[[torch.Tensor], torch.Tensor],
        counters: DampingCounters | None = None,
    ) -> DampedPair:
        """Damp the pair ``(s, y)`` against the current inverse approximation ``H`` (given by its action).

        One host synchronization: :meth:`prepare` on the device, one read, :meth:`finish`.
        """
        draft = self.prepare(s, y, apply_H)
        return self.finish(draft, read_scalars(draft.scalars), counters)

    def prepare(self, s: torch.Tensor, y: torch.Tensor, apply_H: Callable[[torch.Tensor], torch.Tensor]) -> "DampingDraft":
        """Every candidate of the damping on the device, without a host synchronization.

        ``draft.s1, draft.y2`` are the damped pair the branches select (valid when :meth:`finish`
        accepts it); ``draft.scalars`` (0-dim bool or floating tensors, read exactly by
        :func:`~curvature.linalg.read_scalars`) are what :meth:`finish` decides from.
        This is :meth:`prepare_many` with one pair.
        """
        return self.prepare_many([s], [y], [apply_H(y)])[0]

    def prepare_many(self, s: Sequence[torch.Tensor], y: Sequence[torch.Tensor], Hy: Sequence[torch.Tensor]
                     ) -> list["DampingDraft"]:
        """:meth:`prepare` of several pairs (of any sizes, one dtype and device) given ``Hy`` (each ``H`` applied to
        its ``y``): the damping of all of them as the rows of padded matrices (:mod:`curvature.rows`), a few
        kernels in all instead of some forty per pair."""
        if not s:
            return []
        dims = [v.shape[0] for v in s]
        S, Y = padded(s), padded(y)
        S1, theta1_t, active1_t = _powell_h(S, Y, padded(Hy), self.mu1, self.powell_sign)
        ss = row_dot(S1, S1)
        s1y = row_dot(S1, Y)
        denom = ss - s1y
        theta2_t = (1.0 - self.mu2) * ss / denom
        if self.variant == "lm":
            no = torch.zeros_like(ss, dtype=torch.bool)
            Y2, active2_t, interpolate_t = Y + self.mu2 * S1, ~no, no
        else:
            active2_t = s1y < self.mu2 * ss
            interpolate_t = denom.double() > 1e-12 * ss.double()  # exactly float(denom) > 1e-12 * float(ss)
            # (1 - θ2) rounded as a Python float
            Y_interp = column(theta2_t) * Y + column((1.0 - theta2_t.double()).to(Y.dtype)) * S1
            Y_guard = Y + column((self.mu2 * ss - s1y) / ss) * S1  # only reachable with mu2 >= 1: s̃ᵀỹ = μ2‖s̃‖² exactly
            Y2 = torch.where(column(active2_t), torch.where(column(interpolate_t), Y_interp, Y_guard), Y)
        # finite_flag of each raw and each damped pair, row by row; all in their own dtypes (bool or floating):
        # read_scalars stacks them exactly, with no cast per scalar
        columns = [sums_finite(S.sum(1) + Y.sum(1)), torch.linalg.vector_norm(S, dim=1),
                   torch.linalg.vector_norm(Y, dim=1), active1_t, theta1_t, ss.sqrt(), active2_t, interpolate_t,
                   theta2_t, sums_finite(S1.sum(1) + Y2.sum(1))]
        per_pair = zip(s, y, split_rows(S1, dims), split_rows(Y2, dims), zip(*(c.unbind() for c in columns)))
        return [DampingDraft(si, yi, s1, y2, list(scalars)) for si, yi, s1, y2, scalars in per_pair]

    def finish(self, draft: "DampingDraft", values: list[float], counters: DampingCounters | None = None) -> DampedPair:
        """The decisions of the damping from ``values`` (``draft.scalars`` read on the host), counted."""
        s, y, s1, y2 = draft.s, draft.y, draft.s1, draft.y2
        if counters is not None:
            counters.pairs += 1

        def skip(reason: str) -> DampedPair:
            if counters is not None:
                counters.skip(reason)
            return DampedPair(s, y, skip_reason=reason)

        (finite, norm_s, norm_y, active1, theta1, norm_s1, active2, interpolate, theta2, finite2) = values
        if not finite and not all_finite(s, y):
            return skip("non-finite pair")
        if norm_s <= self.min_norm and norm_y <= self.min_norm:
            return skip("zero pair")
        if not norm_s1 > self.min_norm:
            return skip("damped s is (numerically) zero")
        active1, active2 = bool(active1), bool(active2)
        theta1 = theta1 if active1 else 1.0
        guarded = self.variant != "lm" and active2 and not interpolate
        theta2 = theta2 if (self.variant != "lm" and active2 and interpolate) else 1.0
        if not finite2 and not all_finite(s1, y2):
            return skip("non-finite damped pair")
        if counters is not None:
            counters.step1 += int(active1)
            counters.step2 += int(active2)
            counters.step2_guard += int(guarded)
        return DampedPair(s1, y2, theta1, theta2, active1, active2)


@dataclass
class DampingDraft:
    """:meth:`DoubleDamping.prepare`'s device-side result: the raw pair, the candidate damped pair,
    and the scalars (0-dim bool or floating tensors) its decisions need."""

    s: torch.Tensor
    y: torch.Tensor
    s1: torch.Tensor
    y2: torch.Tensor
    scalars: list[torch.Tensor]
