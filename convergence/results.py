"""Result objects shared by every empirical check of the convergence harness."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class Verdict(str, enum.Enum):
    """PASS means "not rejected" (or equivalence shown where the check says so)."""

    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        check: the check's id, e.g. ``"E4"``.
        assumption: what is tested, e.g. ``"AS.3 bounded preconditioner"``.
        statistic: the observed statistic (a number).
        expected: the bound or expected value it is compared against (a number or a short text).
        confidence: the confidence level used (1.0 for deterministic checks).
        verdict: PASS / FAIL / INCONCLUSIVE.
        evidence: everything needed to audit the verdict (arrays as lists, per-layer values ...).
        notes: caveats, e.g. that the run violates theory-mode settings.
    """

    check: str
    assumption: str
    statistic: float
    expected: Any
    confidence: float
    verdict: Verdict
    evidence: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value
