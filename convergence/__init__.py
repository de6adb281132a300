"""Convergence harness: checks of the stochastic quasi-Newton assumptions on real training runs.

``convergence.check(model, loss_fn, data, make_optimizer, steps=..., checks=[...], device=...)``
runs them on any model (see :mod:`convergence.api`); ``python -m convergence check`` is the CLI.
"""

from convergence.api import check
from convergence.harness import Report
from convergence.results import CheckResult, Verdict

__all__ = ["check", "Report", "CheckResult", "Verdict"]
