"""``python -m benchmarks.matrix_free_options``: each variant trains and reports its figures."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.experiment import build_config
from benchmarks.experiment.datasets import DataBundle
from benchmarks.matrix_free_options import VARIANTS, run_variant


def test_variants_train_and_report():
    cfg = build_config(config_file={"dataset": "curves", "n_train": 40, "n_test": 20, "batch_size": 20,
                                    "widths": [16, 3, 16], "epochs": 1})
    gen = torch.Generator().manual_seed(0)
    data = DataBundle(torch.rand(40, 16, generator=gen), torch.rand(20, 16, generator=gen), "random")
    out = {v: run_variant(cfg, data, v, 1) for v in VARIANTS}
    for v, res in out.items():
        assert res["steps"] == 2 and len(res["cg_iterations"]) == 2, v
        assert res["products"] > 0 and math.isfinite(res["final_train_loss"]), v
    # the options reach the optimizer: same start, same batches, different runs
    assert out["hf"]["final_train_loss"] != out["hf-martens"]["final_train_loss"]
    assert out["lm"]["final_train_loss"] != out["lm-maxdiag"]["final_train_loss"]
    with pytest.raises(ValueError, match="unknown variant"):
        run_variant(cfg, data, "sgd", 1)
