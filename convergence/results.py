"""Result objects shared by every empirical check of the convergence harness."""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any


class Verdict(str, enum.Enum):
    """The outcome of a check.

    * ``PASS``: the check ran, *could have failed* on this run, and did not reject (or showed
      equivalence where the check says so);
    * ``FAIL``: the check rejected (a finding about the optimizer, the data pipeline or the run);
    * ``NOT_APPLICABLE``: the check's hypothesis does not hold on this run, or its statistic cannot
      discriminate here (e.g. a bound that promises nothing); the reason is in the notes and in
      ``evidence["not_applicable"]``. Never counted as a pass;
    * ``INCONCLUSIVE``: the check ran but had too little evidence to decide (e.g. no equivalence);
    * ``ERROR``: the check itself raised; the error is in ``evidence["error"]``.
    """

    PASS = "PASS"
    FAIL = "FAIL"
    NOT_APPLICABLE = "NOT_APPLICABLE"
    INCONCLUSIVE = "INCONCLUSIVE"
    ERROR = "ERROR"


@dataclass
class CheckResult:
    """The outcome of one check.

    Attributes:
        check: the check's id, e.g. ``"E4"``.
        assumption: what is tested, e.g. ``"AS.3 bounded preconditioner"``.
        statistic: the observed statistic (a number).
        expected: the bound or expected value it is compared against (a number or a short text).
        confidence: the confidence level used (1.0 for deterministic checks).
        verdict: PASS / FAIL / NOT_APPLICABLE / INCONCLUSIVE / ERROR (see :class:`Verdict`).
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

    @property
    def reason(self) -> str | None:
        """Why the check is NOT_APPLICABLE (None otherwise)."""
        if self.verdict is not Verdict.NOT_APPLICABLE:
            return None
        return str(self.evidence.get("not_applicable", self.notes[0] if self.notes else ""))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        return _jsonable(data)


def not_applicable(check: str, assumption: str, reason: str, *, expected: Any = "-",
                   evidence: dict[str, Any] | None = None, statistic: float = math.nan) -> CheckResult:
    """A NOT_APPLICABLE result whose ``reason`` is the first note and ``evidence["not_applicable"]``."""
    ev = dict(evidence or {})
    ev["not_applicable"] = reason
    return CheckResult(check, assumption, statistic, expected, 1.0, Verdict.NOT_APPLICABLE, ev, [reason])


def error_result(check: str, exc: BaseException) -> CheckResult:
    """An ERROR result for a check that raised ``exc``."""
    text = f"{type(exc).__name__}: {exc}"
    return CheckResult(check, "check raised an exception", math.nan, "-", 1.0, Verdict.ERROR, {"error": text},
                       [f"the check raised {text}"])


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
