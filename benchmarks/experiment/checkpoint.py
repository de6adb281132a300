"""Per-run checkpoints (written after every epoch) and finished-run results, written atomically.

A run directory holds ``checkpoint.pt`` (model and optimizer ``state_dict``, the data-shuffling
generator, the global RNG states and the curves so far) and, once the run has ended,
``result.json``. Files are written to a temporary name and renamed, so an interrupted write never
leaves a truncated checkpoint. Checkpoints are read with ``torch.load(weights_only=False)``: only
load checkpoints you wrote yourself.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT", "RESULT", "jsonable", "load_checkpoint", "read_json", "save_checkpoint", "write_json"]

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
FORMAT = 1


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def jsonable(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None and tuples by lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(jsonable(data), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 (pickle/zip errors of all kinds)
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this runner (format {FORMAT})")
    return data
