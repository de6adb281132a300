r"""Experiment configuration: presets, JSON config files, ``--set`` overrides, grids.

Precedence (later wins): built-in defaults (= the ``paper`` setting) < ``--preset`` < ``--config``
file < explicit command-line flags < ``--set opt.key=value``.

A config file is a JSON object with any of the keys of :class:`ExperimentConfig` (``preset`` too),
plus ``settings`` (``{"kbfgs": {"lr": 0.3}, ...}``) and ``grid_values``
(``{"kbfgs": {"lr": [0.1, 0.3], "damping": "0.01:1"}}``)::

    {"dataset": "curves", "epochs": 20, "optimizers": ["kbfgs", "adam"],
     "settings": {"adam": {"lr": 3e-4}}, "grid_values": {"adam": {"eps": [1e-8, 1e-4]}}}

Unknown keys, unknown optimizers, unknown settings and invalid values raise ``ValueError`` with
a message that names the offending key.

Grids. ``--grid`` searches, for every optimizer, the product of the value lists of its tuned knobs
(lr and λ for K-BFGS/K-BFGS(L)/KFAC, lr and ε for Adam/RMSprop, lr for SGD-m). The default lists
are 1-3-10 log grids (:func:`log_grid`) around the defaults (:data:`DEFAULT_GRIDS`; the paper's
exact grids are UNCONFIRMED, spec §6). A value list is a JSON list or a range ``"lo:hi"`` that
expands to every :math:`\{1, 3\}\times 10^k` in [lo, hi]. Giving values for one knob
(``--grid-set adam.lr=1e-4:1e-2``) replaces that knob's list only; the other tuned knobs keep their
default lists (give one value, ``--grid-set adam.eps=1e-4``, to hold a knob fixed). Values for a
knob that is not tuned by default (``--grid-set kbfgsl.memory=10,100``) add it to the product.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any

from benchmarks.experiment.settings import (DEFAULT_OPTIMIZERS, OPTIMIZERS, OptimizerSettings, check_optimizer_name,
                                            make_settings, parse_value)
from benchmarks.models import PAPER_SEED

__all__ = [
    "DATASETS",
    "DEFAULT_GRIDS",
    "PRESETS",
    "ExperimentConfig",
    "build_config",
    "load_config_file",
    "log_grid",
    "parse_grid_values",
    "parse_set",
]

DATASETS = ("curves", "mnist", "faces")

#: Presets: partial configs applied over the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # CI: seconds. CURVES with 2000 train / 1000 test images, one epoch of batch 500.
    "tiny": {"dataset": "curves", "n_train": 2000, "n_test": 1000, "epochs": 1, "batch_size": 500},
    # ~5 minutes on a 2-core CPU for all six optimizers: 360 steps each on 3000 CURVES images, enough
    # for K-BFGS/K-BFGS(L) to leave the mean-image plateau (train loss ~140.8) that Adam/RMSprop leave
    # more slowly and SGD-m/KFAC (at the spec's defaults) do not leave in this budget. One thread: the
    # curves are then reproducible, and timings do not collapse when other processes share the cores.
    "quick": {"dataset": "curves", "n_train": 3_000, "n_test": 1_000, "epochs": 120, "batch_size": 1000,
              "threads": 1},
    # the paper: full splits, batch 1000, 100 epochs (the authors' max_epoch default).
    "paper": {"n_train": None, "n_test": None, "epochs": 100, "batch_size": 1000},
}


def log_grid(lo: float, hi: float) -> tuple[float, ...]:
    r"""Every value :math:`c\cdot 10^k` with :math:`c \in \{1, 3\}` in [lo, hi], ascending."""
    if not (lo > 0 and hi >= lo and math.isfinite(hi)):
        raise ValueError(f"a grid range needs 0 < lo <= hi, got {lo!r}:{hi!r}")
    out = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for c in (1, 3):
            v = float(f"{c}e{k}")
            if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                out.append(v)
    return tuple(out)


#: Default 1-3-10 grids per optimizer and tuned knob.
DEFAULT_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "kbfgs": {"lr": log_grid(0.01, 1), "damping": log_grid(0.03, 3)},
    "kbfgsl": {"lr": log_grid(0.01, 1), "damping": log_grid(0.03, 3)},
    "kfac": {"lr": log_grid(0.03, 3), "damping": log_grid(0.1, 10)},
    "adam": {"lr": log_grid(1e-5, 1e-2), "eps": log_grid(1e-5, 1e-3)},
    "rmsprop": {"lr": log_grid(1e-5, 1e-2), "eps": log_grid(1e-5, 1e-3)},
    "sgdm": {"lr": log_grid(1e-5, 1e-1)},
    "hf": {"lr": (1.0,), "damping": log_grid(0.1, 10)},
    "sfn": {"lr": (1.0,), "damping": log_grid(1e-3, 1e-1)},
    "lm": {"lr": (1.0,), "damping": log_grid(1e-4, 1e-2)},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines an experiment (not where its outputs go).

    ``n_train``/``n_test`` = None: the whole split (CURVES: 20,000/10,000). ``max_time``: stop a
    run once its cumulative training *CPU* time (``time.process_time``, summed over threads)
    reaches this many seconds, checked at epoch ends (the authors' ``max_cpu_time``).
    ``target``: the loss for "time to target" (None: the best first-order baseline's final training
    loss; without a first-order run, the worst final training loss × 1.05).
    ``divergence_factor``: a run stops as diverged once its training loss exceeds this multiple
    of its initial loss (None or inf: only non-finite losses count, as in the authors' code).
    ``tau``: the L2 coefficient in the *reported* losses, + ½τ‖θ‖². ``widths``: a custom
    autoencoder (layer widths) instead of the paper's. ``mnist_test_as_train``: train on the
    first ``n_train`` (default 8,000) and test on the last ``n_test`` (default 2,000) images of
    MNIST's 10k test split (a smoke run when only that split is at hand). ``curves_seed``: seed of
    the synthetic CURVES generator. ``settings``: per-optimizer settings (all six, defaults filled).
    ``grid_values``: per-optimizer {knob: values} used by ``--grid``.
    """

    dataset: str = "curves"
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    epochs: int = 100
    batch_size: int = 1000
    device: str = "cpu"
    seed: int = PAPER_SEED
    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    max_time: float | None = None
    target: float | None = None
    divergence_factor: float | None = 1e3
    tau: float = 1e-5
    widths: tuple[int, ...] | None = None
    curves_seed: int = 0
    mnist_test_as_train: bool = False
    threads: int | None = None
    grid: bool = False
    preset: str | None = None
    settings: Mapping[str, OptimizerSettings] = field(default_factory=lambda: {n: make_settings(n) for n in OPTIMIZERS})
    grid_values: Mapping[str, Mapping[str, tuple]] = field(
        default_factory=lambda: {n: dict(g) for n, g in DEFAULT_GRIDS.items()})

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        opts = tuple(self.optimizers)
        if not opts:
            raise ValueError("optimizers must name at least one optimizer")
        for name in opts:
            check_optimizer_name(name)
        if len(set(opts)) != len(opts):
            raise ValueError(f"optimizers lists a name twice: {list(opts)}")
        object.__setattr__(self, "optimizers", opts)
        if not _is_int(self.epochs) or self.epochs < 1:
            raise bad("epochs", "an integer >= 1")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise bad("batch_size", "an integer >= 1")
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith("cuda")):
            raise bad("device", "'cpu' or 'cuda[:i]'")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        if not _is_int(self.curves_seed) or self.curves_seed < 0:
            raise bad("curves_seed", "an integer >= 0")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise bad(name, "an integer >= 1 or null")
        if self.n_train is not None and self.n_train < self.batch_size:
            raise ValueError(f"n_train ({self.n_train}) must be >= batch_size ({self.batch_size})")
        if self.max_time is not None and not (_is_real(self.max_time) and self.max_time > 0):
            raise bad("max_time", "a number > 0 or null")
        if self.target is not None and not (_is_real(self.target)):
            raise bad("target", "a finite number or null")
        df = self.divergence_factor
        if df is not None and not (isinstance(df, (int, float)) and not isinstance(df, bool) and df > 1):
            raise bad("divergence_factor", "a number > 1 (inf or null: never)")
        if not (_is_real(self.tau) and self.tau >= 0):
            raise bad("tau", "a number >= 0")
        if self.widths is not None:
            w = tuple(self.widths)
            if len(w) < 3 or not all(_is_int(x) and x >= 1 for x in w):
                raise bad("widths", "a list of at least 3 positive integers")
            object.__setattr__(self, "widths", w)
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise bad("threads", "an integer >= 1 or null")
        for name in ("mnist_test_as_train", "grid"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.mnist_test_as_train and self.dataset != "mnist":
            raise ValueError("mnist_test_as_train needs dataset 'mnist'")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        for name, s in self.settings.items():
            check_optimizer_name(name)
            if not isinstance(s, OPTIMIZERS[name]):
                raise ValueError(f"settings[{name!r}] must be a {OPTIMIZERS[name].__name__}")
        missing = [n for n in opts if n not in self.settings]
        if missing:
            raise ValueError(f"no settings for {missing}")
        for name, grid in self.grid_values.items():
            check_optimizer_name(name)
            for key, values in grid.items():
                if key not in OPTIMIZERS[name].field_names():
                    raise ValueError(f"grid_values: unknown {name} setting {key!r}; known: "
                                     f"{', '.join(OPTIMIZERS[name].field_names())}")
                if not values:
                    raise ValueError(f"grid_values: {name}.{key} has no values")
                for v in values:  # every value must make valid settings
                    try:
                        self.settings.get(name, make_settings(name)).with_values(**{key: v})
                    except ValueError as exc:
                        raise ValueError(f"grid_values: {name}.{exc}") from None

    # ------------------------------------------------------------------ views
    def grid_for(self, name: str) -> dict[str, tuple]:
        """The {knob: values} searched for ``name`` in grid mode (its tuned knobs by default)."""
        grid = self.grid_values.get(name, {})
        return {k: tuple(grid[k]) for k in grid}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :func:`build_config` reads back to an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "settings":
                v = {n: s.as_dict() for n, s in v.items()}
            elif f.name == "grid_values":
                v = {n: {k: list(vals) for k, vals in g.items()} for n, g in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


_TOP_LEVEL = tuple(f.name for f in fields(ExperimentConfig))


def parse_set(text: str) -> tuple[str, str, Any]:
    """``"kbfgs.lr=0.3"`` -> ``("kbfgs", "lr", 0.3)`` (the optimizer name is checked)."""
    if "=" not in text:
        raise ValueError(f"--set expects OPTIMIZER.KEY=VALUE, got {text!r}")
    lhs, rhs = text.split("=", 1)
    if "." not in lhs:
        raise ValueError(f"--set expects OPTIMIZER.KEY=VALUE, got {text!r}")
    name, key = (part.strip() for part in lhs.split(".", 1))
    check_optimizer_name(name)
    if key not in OPTIMIZERS[name].field_names():
        raise ValueError(f"--set {text!r}: unknown {name} setting {key!r}; known: "
                         f"{', '.join(OPTIMIZERS[name].field_names())}")
    return name, key, parse_value(rhs)


def parse_grid_values(value: Any, where: str) -> tuple:
    """A grid value list: a JSON list of values, ``"a,b,c"`` or a 1-3-10 range ``"lo:hi"``."""
    if isinstance(value, str):
        text = value.strip()
        if ":" in text:
            lo, hi = text.split(":", 1)
            try:
                return log_grid(float(lo), float(hi))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        return tuple(parse_value(v) for v in text.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if _is_real(value):
        return (value,)
    raise ValueError(f"{where}: expected a list, 'a,b,c' or 'lo:hi', got {value!r}")


def load_config_file(path: str | PathLike[str]) -> dict[str, Any]:
    """Read a JSON config file (an object); errors name the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read config file {p}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {p} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a JSON object, got {type(data).__name__}")
    return data


def _merge_layer(raw: dict[str, Any], settings: dict[str, dict], grids: dict[str, dict],
                 layer: Mapping[str, Any], where: str) -> None:
    for key, value in layer.items():
        if key == "settings":
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: 'settings' must be an object of optimizer -> {{key: value}}")
            for name, values in value.items():
                check_optimizer_name(name)
                if not isinstance(values, Mapping):
                    raise ValueError(f"{where}: settings.{name} must be an object")
                for k, v in values.items():
                    if k not in OPTIMIZERS[name].field_names():
                        raise ValueError(f"{where}: unknown {name} setting {k!r}; known: "
                                         f"{', '.join(OPTIMIZERS[name].field_names())}")
                    settings.setdefault(name, {})[k] = v
        elif key == "grid_values":
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: 'grid_values' must be an object of optimizer -> {{key: values}}")
            for name, g in value.items():
                check_optimizer_name(name)
                if not isinstance(g, Mapping):
                    raise ValueError(f"{where}: grid_values.{name} must be an object")
                for k, v in g.items():
                    grids.setdefault(name, {})[k] = parse_grid_values(v, f"{where}: grid_values.{name}.{k}")
        elif key in _TOP_LEVEL:
            if key == "optimizers" and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            raw[key] = value
        else:
            raise ValueError(f"{where}: unknown key {key!r}; known: {', '.join(_TOP_LEVEL)}")


def build_config(
    *,
    preset: str | None = None,
    config_file: str | PathLike[str] | Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
    sets: Sequence[str] = (),
    grid_sets: Sequence[str] = (),
) -> ExperimentConfig:
    """Merge defaults, preset, config file, explicit CLI values and ``--set``/``--grid-set`` strings.

    ``cli`` holds only the options the user gave (None values are ignored). A preset named in the
    config file applies unless ``preset`` is given.
    """
    file_layer: Mapping[str, Any] = {}
    if config_file is not None:
        file_layer = config_file if isinstance(config_file, Mapping) else load_config_file(config_file)
        where = "config" if isinstance(config_file, Mapping) else f"config file {config_file}"
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    chosen = preset if preset is not None else cli.get("preset", file_layer.get("preset"))
    if chosen is not None and chosen not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {chosen!r}")

    raw: dict[str, Any] = {}
    settings: dict[str, dict[str, Any]] = {}
    grids: dict[str, dict[str, tuple]] = {n: dict(g) for n, g in DEFAULT_GRIDS.items()}
    if chosen is not None:
        _merge_layer(raw, settings, grids, PRESETS[chosen], f"preset {chosen}")
    if file_layer:
        _merge_layer(raw, settings, grids, file_layer, where)
    _merge_layer(raw, settings, grids, cli, "command line")
    raw["preset"] = chosen
    for text in sets:
        name, key, value = parse_set(text)
        settings.setdefault(name, {})[key] = value
    for text in grid_sets:
        if "=" not in text:
            raise ValueError(f"--grid-set expects OPTIMIZER.KEY=VALUES, got {text!r}")
        lhs, rhs = text.split("=", 1)
        name, key, _ = parse_set(f"{lhs}=0")
        grids.setdefault(name, {})[key] = parse_grid_values(rhs, f"--grid-set {text!r}")

    dataset = raw.get("dataset", "curves")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    built = {n: make_settings(n, settings.get(n)) for n in OPTIMIZERS}
    if "optimizers" in raw and isinstance(raw["optimizers"], (list, tuple)):
        raw["optimizers"] = tuple(raw["optimizers"])
    if "widths" in raw and isinstance(raw["widths"], (list, tuple)):
        raw["widths"] = tuple(raw["widths"])
    return ExperimentConfig(**raw, settings=built, grid_values=grids)


def config_summary(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as a JSON-able dict restricted to the optimizers that run."""
    d = cfg.to_dict()
    d["settings"] = {n: d["settings"][n] for n in cfg.optimizers}
    d["grid_values"] = {n: d["grid_values"].get(n, {}) for n in cfg.optimizers}
    return d


def fingerprint(cfg: ExperimentConfig, name: str, settings: OptimizerSettings) -> dict[str, Any]:
    """What fixes the trajectory of one run (checked on ``--resume``): not epochs, budgets or targets."""
    keys = ("dataset", "batch_size", "device", "seed", "data_dir", "n_train", "n_test", "tau", "widths",
            "curves_seed", "mnist_test_as_train")
    d = {k: getattr(cfg, k) for k in keys}
    d["widths"] = list(d["widths"]) if d["widths"] is not None else None
    d["optimizer"] = name
    d["settings"] = asdict(settings)
    return json.loads(json.dumps(d))
