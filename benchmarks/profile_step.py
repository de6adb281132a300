r"""Where one training step's time goes: a ``torch.profiler`` breakdown for K-BFGS, KFAC or any method.

Usage::

    python -m benchmarks.profile_step --model mnist --method kbfgs --method kfac --out results/profile

One step (per phase: KFAC's inverse steps and plain steps are profiled separately and weighted by
their frequency) is recorded with Python stack tracing. Three views, top ``--top`` rows each:

* **by function (inclusive)**: every function of our packages (``curvature/``, ``optimizers/``)
  that appears on the stack, with the total time spent inside it (children included; a recursive
  call is counted once) and its number of calls. Names are ``Class.method`` (from the source).
* **by region (exclusive)**: every op's own time and every Python frame's own (interpreter) time is
  charged to the innermost of our functions above it, split by what lies in between: the model's
  forward (``nn.Module`` calls), autograd's backward (engine), the benchmark closure (loss,
  ``zero_grad``), or our own code. These rows add up to the whole step.
* **by op**: self time per ATen op (CPU; on CUDA also the device time of the kernels each launched).

If the library has ``torch.profiler.record_function`` labels (annotations other than torch's own
``Optimizer.*`` and ``nn.Module:*``), a fourth view groups by them; today it has none, which the
report says. Python tracing slows the interpreter, so profiled times overstate Python overhead;
the report prints the unprofiled step time beside the profiled one.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.throughput import OUR_METHODS, Workload, make_candidate
from benchmarks.timing import make_timer, summarize, synchronize

ROOT_LABEL = "benchmark::step"
OUR_PACKAGES = ("curvature", "optimizers")
_FRAME = re.compile(r"^(?P<file>.+?\.py)\((?P<line>\d+)\): (?P<func>.+)$")
_TORCH_LABELS = ("Optimizer.", "nn.Module:", "ProfilerStep", "benchmark::")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- names
@lru_cache(maxsize=None)
def _functions(relpath: str) -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    """For one of our source files: line of each ``def`` (and of its decorators) -> qualified name,
    and the ``(first, last, qualname)`` line span of every function (for comprehension frames)."""
    try:
        tree = ast.parse((REPO_ROOT / relpath).read_text())
    except (OSError, SyntaxError):
        return {}, ()
    starts: dict[int, str] = {}
    spans: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                starts[child.lineno] = name
                first = child.lineno
                for dec in child.decorator_list:
                    starts[dec.lineno] = name
                    first = min(first, dec.lineno)
                spans.append((first, child.end_lineno or child.lineno, name))
                visit(child, f"{name}.<locals>.")

    visit(tree, "")
    return starts, tuple(spans)


def qualname(relpath: str, line: int, func: str) -> str:
    """``Class.method`` for a frame of ``relpath`` whose code starts at ``line``; a comprehension or
    lambda (``<genexpr>``, ``<listcomp>``, ``<lambda>``) is named after the function around it."""
    starts, spans = _functions(relpath)
    if func.startswith("<"):
        around = [s for s in spans if s[0] <= line <= s[1]]
        if around:
            return f"{max(around, key=lambda s: s[0])[2]}.{func}"
        return func
    return starts.get(line, func)


def frame_of(name: str) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of a Python-frame event name such as ``curvature/blocks.py(120): precondition``."""
    m = _FRAME.match(name)
    return (m["file"], int(m["line"]), m["func"]) if m else None


def our_function(name: str) -> str | None:
    """The qualified name of an event that is a frame of one of our packages, else None."""
    frame = frame_of(name)
    if frame is None:
        return None
    file, line, func = frame
    parts = Path(file).parts
    if not parts or parts[0] not in OUR_PACKAGES:
        return None
    return f"{Path(file).stem}.{qualname(file, line, func)}"


def _marker(event: Any) -> str | None:
    """What an event on the path from an op to its owner says about the region."""
    name = event.name
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward (autograd)"
    if name.startswith("nn.Module:") or name.startswith("torch/nn/modules/module.py"):
        return "model forward"
    if name.startswith("Optimizer.zero_grad"):
        return "zero_grad"
    frame = frame_of(name)
    if frame is not None and Path(frame[0]).parts[:1] == ("benchmarks",):
        return "closure (loss)"
    return None


# ---------------------------------------------------------------------------------- tables
@dataclass
class Table:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def text(self) -> str:
        cells = [self.columns] + [tuple(_cell(v) for v in row) for row in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(self.columns))]
        lines = [self.title]
        for j, row in enumerate(cells):
            lines.append("  ".join(v.rjust(w) if j and i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns), "rows": [list(r) for r in self.rows]}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@dataclass
class PhaseProfile:
    """The profile of the steps of one phase."""

    phase: str
    weight: float
    steps: int
    unprofiled_ms: float
    profiled_ms: float
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ProfileReport:
    method: str
    workload: str
    batch: int
    device: str
    phases: list[PhaseProfile]

    def text(self) -> str:
        out = [f"== profile: {self.method} on {self.workload} (batch {self.batch}, {self.device}) =="]
        for ph in self.phases:
            out.append(f"-- phase {ph.phase!r} (weight {ph.weight:.3g}), {ph.steps} step(s): "
                       f"{ph.unprofiled_ms:.1f} ms/step unprofiled, {ph.profiled_ms:.1f} ms/step profiled")
            out += [f"   note: {n}" for n in ph.notes]
            out += [t.text() for t in ph.tables]
        return "\n\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "workload": self.workload, "batch": self.batch, "device": self.device,
                "phases": [{"phase": p.phase, "weight": p.weight, "steps": p.steps, "unprofiled_ms": p.unprofiled_ms,
                            "profiled_ms": p.profiled_ms, "notes": p.notes, "tables": [t.as_dict() for t in p.tables]}
                           for p in self.phases]}


# ---------------------------------------------------------------------------------- attribution
def _is_op(event: Any) -> bool:
    return not getattr(event, "is_python_function", False) and not event.is_user_annotation


def _device_self_us(event: Any) -> float:
    return float(getattr(event, "self_device_time_total", 0.0) or 0.0)


def _within(events: Iterable[Any], roots: list[Any]) -> list[Any]:
    """Events that have one of ``roots`` as an ancestor (or are one)."""
    root_ids = {id(r) for r in roots}
    out = []
    for e in events:
        p = e
        while p is not None:
            if id(p) in root_ids:
                out.append(e)
                break
            p = p.cpu_parent
    return out


def attribute(events: Sequence[Any], root_total_us: float, device_total_us: float, top: int,
              steps: int) -> list[Table]:
    """The inclusive, exclusive-by-region, op and label tables (times in ms per step)."""
    per = 1.0 / (1000.0 * steps)
    cuda = device_total_us > 0
    share_base = device_total_us if cuda else root_total_us
    unit = "device" if cuda else "cpu"

    # inclusive by our function (outermost instance of each recursion)
    incl: dict[str, list[float]] = {}
    for e in events:
        fn = our_function(e.name)
        if fn is None:
            continue
        p, nested = e.cpu_parent, False
        while p is not None:
            if our_function(p.name) == fn:
                nested = True
                break
            p = p.cpu_parent
        if nested:
            continue
        acc = incl.setdefault(fn, [0.0, 0.0, 0])
        acc[0] += e.cpu_time_total
        acc[1] += float(getattr(e, "device_time_total", 0.0) or 0.0)
        acc[2] += 1
    key = 1 if cuda else 0
    inclusive = Table(
        f"by function, inclusive ({unit} time; % of the step)",
        ("function", "ms/step", "%", "calls/step") + (("cpu ms/step",) if cuda else ()),
        [(fn, v[key] * per, 100.0 * v[key] / share_base if share_base else 0.0, round(v[2] / steps, 2))
         + ((v[0] * per,) if cuda else ())
         for fn, v in sorted(incl.items(), key=lambda kv: -kv[1][key])[:top]],
    )

    # exclusive by (owner, region)
    excl: dict[str, list[float]] = {}
    for e in events:
        owner, region, p = None, None, e
        while p is not None:
            fn = our_function(p.name)
            if fn is not None:
                owner = fn
                break
            if region is None:
                region = _marker(p)
            p = p.cpu_parent
        label = (owner or "(outside our packages)") + (f" > {region}" if region else "")
        acc = excl.setdefault(label, [0.0, 0.0])
        acc[0] += e.self_cpu_time_total
        acc[1] += _device_self_us(e) if _is_op(e) else 0.0
    exclusive = Table(
        f"by region, exclusive (self time charged to the innermost of our functions; {unit} time)",
        ("owner > region", "ms/step", "%") + (("cpu ms/step",) if cuda else ()),
        [(k, v[key] * per, 100.0 * v[key] / share_base if share_base else 0.0) + ((v[0] * per,) if cuda else ())
         for k, v in sorted(excl.items(), key=lambda kv: -kv[1][key])[:top]],
    )

    # by op
    ops: dict[str, list[float]] = {}
    for e in events:
        if not _is_op(e) or e.name == ROOT_LABEL:
            continue
        acc = ops.setdefault(e.name, [0.0, 0.0, 0])
        acc[0] += e.self_cpu_time_total
        acc[1] += _device_self_us(e)
        acc[2] += 1
    by_op = Table(
        f"by op (self {unit} time)",
        ("op", "ms/step", "%", "calls/step") + (("cpu ms/step",) if cuda else ()),
        [(name, v[key] * per, 100.0 * v[key] / share_base if share_base else 0.0, round(v[2] / steps, 2))
         + ((v[0] * per,) if cuda else ())
         for name, v in sorted(ops.items(), key=lambda kv: -kv[1][key])[:top]],
    )
    tables = [inclusive, exclusive, by_op]

    labels: dict[str, list[float]] = {}
    for e in events:
        if e.is_user_annotation and not e.name.startswith(_TORCH_LABELS):
            acc = labels.setdefault(e.name, [0.0, 0])
            acc[0] += e.cpu_time_total
            acc[1] += 1
    if labels:
        tables.append(Table("by record_function label (inclusive cpu time)", ("label", "ms/step", "%", "calls/step"),
                            [(k, v[0] * per, 100.0 * v[0] / root_total_us if root_total_us else 0.0, round(v[1] / steps, 2))
                             for k, v in sorted(labels.items(), key=lambda kv: -kv[1][0])[:top]]))
    return tables


# ---------------------------------------------------------------------------------- driver
def profile_method(name: str, workload: Workload, device: torch.device | str = "cpu", *, steps: int = 1,
                   warmup: int = 2, seed: int = 0, prefill: bool = True, top: int = 15) -> ProfileReport:
    """Profile ``steps`` steps of each phase of method ``name`` on ``workload`` (after ``warmup`` steps)."""
    device = torch.device(device)
    cand = make_candidate(name, workload, device, seed, prefill)
    for _ in range(max(warmup, 1)):
        cand.step()
    synchronize(device)
    timer = make_timer(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    phases = []
    for phase, weight in sorted(cand.schedule.weights.items(), key=lambda kv: -kv[1]):
        plain = []
        for _ in range(steps):
            cand.prepare(phase)
            plain.append(timer.time(cand.step))
        with profile(activities=activities, with_stack=True, record_shapes=False) as prof:
            for _ in range(steps):
                cand.prepare(phase)
                with record_function(ROOT_LABEL):
                    cand.step()
                synchronize(device)
        events = list(prof.events())
        roots = [e for e in events if e.name == ROOT_LABEL]
        root_total = sum(e.cpu_time_total for e in roots)
        inside = _within(events, roots)
        device_total = sum(_device_self_us(e) for e in inside if _is_op(e))
        ph = PhaseProfile(phase, weight, steps, 1000.0 * summarize(plain).median, root_total / 1000.0 / steps,
                          attribute(inside, root_total, device_total, top, steps))
        if not any(t.title.startswith("by record_function") for t in ph.tables):
            ph.notes.append("no record_function labels in curvature/ or optimizers/: grouped by Python stack and op")
        ph.notes.append("profiled times include Python-tracing overhead (compare with the unprofiled time)")
        phases.append(ph)
    return ProfileReport(name, workload.name, workload.batch, str(device), phases)


def write_report(report: ProfileReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{report.method}.txt").write_text(report.text() + "\n")
    (out / f"profile_{report.method}.json").write_text(json.dumps(report.as_dict(), indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("mnist", "curves", "faces", "tiny"), default="mnist")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--method", action="append", choices=OUR_METHODS, default=None,
                   help="repeatable; default: kbfgs and kfac")
    p.add_argument("--steps", type=int, default=1, help="profiled steps per phase")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=Path("results/profile"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.steps < 1 or args.batch < 1 or args.top < 1:
        print("--steps, --batch and --top must be >= 1", file=sys.stderr)
        return 2
    workload = Workload.autoencoder(args.model, args.batch)
    for name in args.method or ["kbfgs", "kfac"]:
        report = profile_method(name, workload, device, steps=args.steps, warmup=args.warmup, seed=args.seed,
                                prefill=not args.no_prefill, top=args.top)
        write_report(report, args.out)
        print(report.text() + "\n")
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
