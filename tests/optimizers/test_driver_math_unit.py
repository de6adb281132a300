"""Exact unit tests of the driver's per-step math and settings (issue 17, optimizers/driver.py mutants).

Hand-computed oracles for: the lazily converted ``StepInfo`` floats (``_lazy_float``, ``_as_float``), the
fallback settings and step (``_group_of``, ``_fallback_settings``, ``_fallback_text``, ``_fallback_step``),
the inverse schedule (``_inverse_due``), per-chunk blocks (``_chunked_block``), the adaptive-damping
group check (``_layer_settings``), the record checks (``_check_records``, ``_update_statistics``), the
inverse refresh's counter (``_refresh_inverses``), KL clipping (``_kl_scale``) and the Monte-Carlo
Fisher pass (``_monte_carlo_fisher_pass``: its sampled rows, its bookkeeping, its data-parallel noise).
Small float64 models, a few steps; data-parallel cases run on thread ranks (``thread_world``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature.capture import LayerRecord
from curvature.chunked import ChunkedBlock
from curvature.damping import AdaptiveLM
from optimizers import KBFGS, KFAC, CurvatureOptimizer, StepInfo
from optimizers.driver import PartSettings, _as_float, _lazy_float
from optimizers.recipes import diagonal_block
from tests.optimizers import dist_workers as W
from tests.optimizers.test_architectures import Cross
from tests.optimizers.closures import mean_square_closure
from tests.optimizers.test_data_parallel_threads import UNEQUAL2, assert_matches, assert_replicated, threaded
from tests.optimizers.thread_world import run_ranks
from tests.optimizers.messages import exact as _exact

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class WithScale(nn.Module):
    """A Linear layer (preconditioned) and a free parameter ``s`` (on the fallback rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.s = nn.Parameter(torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.s


class Shifted(nn.Module):
    """A Linear layer whose forward needs a keyword-only argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, *, shift: float) -> torch.Tensor:
        return self.lin(x) + shift


def _two_linear() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).to(D)


# ------------------------------------------------------------------ _lazy_float, _as_float
def _holder() -> object:
    """An object with a ``value`` built by ``_lazy_float`` (called here, at test time, not at import)."""
    return type("Holder", (), {"value": _lazy_float("value")})()


def test_lazy_float_keeps_the_detached_tensor_until_the_first_read():
    """A tensor is stored detached under ``_value`` and becomes a Python float on the first read."""
    h = _holder()
    t = torch.tensor(2.5, dtype=D, requires_grad=True) * 1.0
    h.value = t
    stored = h.__dict__["_value"]
    assert isinstance(stored, torch.Tensor) and not stored.requires_grad and float(stored) == 2.5
    got = h.value
    assert type(got) is float and got == 2.5
    assert type(h.__dict__["_value"]) is float and h.__dict__["_value"] == 2.5
    assert h.value == 2.5


@pytest.mark.parametrize("value,want", [(1.5, 1.5), (3, 3.0), (None, None)])
def test_lazy_float_stores_numbers_as_floats_and_none_as_none(value, want):
    h = _holder()
    h.value = value
    assert h.__dict__["_value"] == want and type(h.__dict__["_value"]) is type(want)
    assert h.value == want and type(h.value) is type(want)


def test_lazy_float_unset_reads_none_and_documents_itself():
    prop = _lazy_float("loss")
    assert prop.__doc__ == "``loss`` as a float (converted from the step's tensor on first read)"
    assert prop.fget.__doc__ == prop.fset.__doc__ == prop.__doc__
    assert _holder().value is None


def test_step_info_losses_are_lazy_floats():
    info = StepInfo(step=0, lr=0.1, loss=torch.tensor(0.25, dtype=D), loss_after=2)
    assert isinstance(info.__dict__["_loss"], torch.Tensor) and info.__dict__["_loss_after"] == 2.0
    assert info.loss == 0.25 and type(info.loss) is float and info.loss_after == 2.0


@pytest.mark.parametrize("value,want", [(torch.tensor(1.25, dtype=D, requires_grad=True), 1.25), (1.5, 1.5),
                                        (7, 7.0), (None, None)])
def test_as_float(value, want):
    got = _as_float(value)
    assert got == want and type(got) is type(want)


# ------------------------------------------------------------------ fallback settings and step
def _with_scale(fallback: str, **kw) -> tuple[WithScale, KFAC]:
    torch.manual_seed(0)
    model = WithScale().to(D)
    return model, KFAC(model, lr=0.1, weight_decay=0.0, fallback=fallback, **kw)


def test_group_of_finds_the_group_holding_the_parameter_else_the_defaults():
    torch.manual_seed(0)
    model = WithScale().to(D)
    opt = KFAC(model, lr=0.1, param_groups=[{"params": list(model.lin.parameters())},
                                            {"params": [model.s], "lr": 0.5}])
    assert opt._group_of(model.s) is opt.param_groups[1]
    assert opt._group_of(model.lin.weight) is opt.param_groups[0]
    assert opt._group_of(None) is opt.defaults


def test_fallback_settings_defaults():
    """Adam: lr 1e-3, betas (the group's momentum, 0.999), eps 1e-8; SGD: the group's lr. A mapping without
    ``fallback_eps`` reads eps 1e-8."""
    _, adam = _with_scale("adam", momentum=0.8)
    assert adam._fallback_settings(adam.param_groups[0]) == (1e-3, 0.8, 0.999, 1e-8)
    assert adam._fallback_settings({"lr": 0.1, "momentum": 0.5}) == (1e-3, 0.5, 0.999, 1e-8)
    _, sgd = _with_scale("sgd", momentum=0.8)
    assert sgd._fallback_settings({"lr": 0.25, "momentum": 0.5, "fallback_betas": (0.6, 0.7)}) == (0.25, 0.6, 0.7, 1e-8)


def test_fallback_text_reads_the_parameters_own_group():
    torch.manual_seed(0)
    model = WithScale().to(D)
    opt = KFAC(model, lr=0.1, fallback="adam", param_groups=[
        {"params": list(model.lin.parameters())},
        {"params": [model.s], "fallback_lr": 0.5, "fallback_betas": (0.6, 0.7), "fallback_eps": 0.25}])
    assert opt._fallback_text(model.s) == "fallback (adam, lr=0.5, betas=(0.6, 0.7), eps=0.25)"
    assert opt._fallback_text(None) == "fallback (adam, lr=0.001, betas=(0.9, 0.999), eps=1e-08)"


def _adam_oracle(p: float, grads: list[float], lr: float, b1: float, b2: float, eps: float) -> float:
    """Adam with bias correction over the gradients ``grads`` (Python floats; a constant gradient would hide
    β2, since then the corrected v̂ = g² for any β2)."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_fallback_step_adam_uses_the_groups_betas_and_eps():
    model, opt = _with_scale("adam", fallback_lr=0.01, fallback_betas=(0.5, 0.9), fallback_eps=0.1)
    for grad in ([0.5, -2.0], [-1.0, 3.0]):
        model.s.grad = torch.tensor(grad, dtype=D)
        with torch.no_grad():
            opt._fallback_step(1.0)
    want = [_adam_oracle(1.0, [0.5, -1.0], 0.01, 0.5, 0.9, 0.1), _adam_oracle(-1.0, [-2.0, 3.0], 0.01, 0.5, 0.9, 0.1)]
    torch.testing.assert_close(model.s.detach(), torch.tensor(want, dtype=D), rtol=1e-13, atol=0)
    assert model.lin.weight.grad is None and opt.state[model.s]["adam_step"] == 2


@pytest.mark.parametrize("scale", [None, 0.5])
def test_fallback_step_sgd_scales_the_learning_rate(scale):
    """SGD without momentum: s ← s − lr·scale·g (scale 1 by default)."""
    model, opt = _with_scale("sgd", momentum=0.0)
    model.s.grad = torch.tensor([0.5, -2.0], dtype=D)
    with torch.no_grad():
        if scale is None:
            opt._fallback_step()
        else:
            opt._fallback_step(scale)
    eff = 0.1 * (1.0 if scale is None else scale)
    assert torch.equal(model.s.detach(), torch.tensor([1.0 - eff * 0.5, -1.0 + eff * 2.0], dtype=D))


# ------------------------------------------------------------------ inverse schedule, per-chunk blocks
def test_inverse_due_schedule():
    """Due at multiples of T_inv and at every k ≤ warm-up (inclusive)."""
    opt = KFAC(_two_linear(), lr=0.1, inverse_update_freq=5, inverse_warmup_steps=2)
    assert [k for k in range(12) if opt._inverse_due(k)] == [0, 1, 2, 5, 10]


def test_a_new_per_chunk_block_makes_the_next_inverse_due():
    """A ChunkedBlock built at a step is ``first_inverse_due`` until it was inverted, whatever T_inv says."""
    torch.manual_seed(0)
    model = Cross("kv").to(D)
    x, m = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
    opt = KFAC(model, lr=0.1, damping=0.3, inverse_update_freq=10, inverse_warmup_steps=0)
    opt.step(mean_square_closure(opt, model, x, m))
    slot = opt.slots["attn"]
    assert isinstance(slot.block, ChunkedBlock) and not opt._inverse_due(3)
    slot.block = opt._chunked_block(slot)
    assert opt._inverse_due(3)


def test_chunked_block_builds_one_recipe_block_per_chunk():
    torch.manual_seed(0)
    model = Cross("qkv").to(D)
    opt = KFAC(model, lr=0.1, damping=0.3)
    slot = opt.slots["attn"]
    block = opt._chunked_block(slot)
    assert isinstance(block, ChunkedBlock) and block.name == "attn" and block.adapter is slot.adapter
    rows = slot.adapter.chunk_rows()
    assert list(block.parts) == ["q", "k", "v"]
    for c, (r, b) in block.parts.items():
        assert r == rows[c] and b.kind == "kfac" and b.name == f"attn[{c}]"
        assert (b.adapter.a_dim, b.adapter.g_dim) == (5, 4) and b.a_factor.F.dtype == D


def test_per_chunk_blocks_under_data_parallel_move_the_layer_to_the_fallback():
    """Two thread ranks: cross-attention needs per-chunk blocks, which have no data-parallel reduction."""
    want = ("cross-attention: the packed q/k/v projection is applied in chunks to different inputs, and the "
            "per-chunk blocks are not available (per-chunk blocks have no data-parallel reduction)")

    def rank(comm) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = Cross("kv").to(D)
        x, m = torch.randn(2, 3, 4, dtype=D), torch.randn(2, 5, 4, dtype=D)
        opt = KFAC(model, lr=0.1, damping=0.3, distributed=comm)
        opt.step(mean_square_closure(opt, model, x, m))
        return opt.fallback_reasons, opt.runtime_fallbacks

    results, _ = run_ranks(2, rank)
    for reasons, runtime in results:
        assert reasons == {"attn": want} and runtime == {"attn": want}


# ------------------------------------------------------------------ _layer_settings
def test_adaptive_damping_rejects_groups_with_different_damping():
    model = _two_linear()
    opt = KFAC(model, lr=0.1, damping=AdaptiveLM(damping=1.0), param_groups=[
        {"params": list(model[0].parameters())}, {"params": list(model[1].parameters())}])
    opt.param_groups[1]["damping"] = 2.0
    with pytest.raises(ValueError, match=_exact(
            "AdaptiveLM adapts one damping for all layers, but the param groups set [1.0, 2.0]: give every group "
            "the same damping")):
        opt._layer_settings()
    opt.param_groups[1]["damping"] = 1.0
    assert opt._layer_settings()["1"].damping == 1.0 and opt.damping.damping == 1.0


# ------------------------------------------------------------------ _check_records
NO_STATS = ("no statistics were captured for layer {!r}: run forward and backward on the batch (with gradients "
            "enabled) before step(), or pass a closure")
EMPTY = ("layer '1' saw an empty batch (0 samples): skip empty batches in the training loop (e.g. "
         "DataLoader(..., drop_last=True), or `if len(x) == 0: continue`)")


def _missing(name: str, missing: int, calls: int) -> str:
    return (f"layer {name!r}: {missing} of the {calls} forward calls recorded since the last zero_grad()/step() got "
            "no gradient; every forward with gradients enabled counts as a micro-batch: call loss.backward() after "
            "every training forward (also in the closure), run evaluation forwards under torch.no_grad(), and check "
            "that the loss depends on this layer")


def _record(batch: int, input_rows: torch.Tensor | None = None, grad_rows: torch.Tensor | None = None,
            calls: int = 1, missing: int = 0) -> LayerRecord:
    rec = LayerRecord(batch_size=batch)
    rec.input_rows, rec.grad_rows, rec.calls, rec.missing_grads = input_rows, grad_rows, calls, missing
    return rec


def test_check_records_needs_the_a_rows_of_the_monte_carlo_fisher():
    """fisher="mc": at a statistics step KFAC needs A rows (G rows come from the sampled pass)."""
    opt = KFAC(_two_linear(), lr=0.1, fisher="mc", likelihood="gaussian")
    with pytest.raises(RuntimeError, match=_exact(NO_STATS.format("0"))):
        opt._check_records({}, True)
    assert opt._check_records({}, False) is None


def test_check_records_skips_a_layer_without_record_and_checks_the_next():
    opt = KFAC(_two_linear(), lr=0.1)
    with pytest.raises(RuntimeError, match=_exact(EMPTY)):
        opt._check_records({"1": _record(0)}, False)


@pytest.mark.parametrize("batch,rows", [(0, None), (2, (0, 3))], ids=["no-samples", "no-rows"])
def test_check_records_rejects_an_empty_batch(batch, rows):
    opt = KFAC(_two_linear(), lr=0.1)
    rec = _record(batch, None if rows is None else torch.zeros(rows, dtype=D))
    with pytest.raises(RuntimeError, match=_exact(EMPTY)):
        opt._check_records({"0": _record(2, torch.ones(2, 2, dtype=D)), "1": rec}, False)


@pytest.mark.parametrize("batch,rows", [(1, (1, 3)), (2, (2, 0)), (2, None)], ids=["one", "no-columns", "no-rows"])
def test_check_records_accepts_a_nonempty_batch(batch, rows):
    opt = KFAC(_two_linear(), lr=0.1)
    rec = _record(batch, None if rows is None else torch.zeros(rows, dtype=D))
    assert opt._check_records({"0": rec, "1": rec}, False) is None


@pytest.mark.parametrize("missing,grads,calls,count", [(1, True, 3, 1), (0, False, 2, 2)],
                         ids=["some-missing", "no-grad-rows"])
def test_check_records_rejects_forwards_without_gradient(missing, grads, calls, count):
    opt = KFAC(_two_linear(), lr=0.1)
    good = _record(2, torch.ones(2, 2, dtype=D), torch.ones(2, 2, dtype=D))
    bad = _record(2, torch.ones(2, 2, dtype=D), torch.ones(2, 2, dtype=D) if grads else None, calls, missing)
    with pytest.raises(RuntimeError, match=_exact(_missing("1", count, calls))):
        opt._check_records({"0": good, "1": bad}, True)
    assert opt._check_records({"0": good, "1": good}, True) is None


# ------------------------------------------------------------------ _update_statistics, _refresh_inverses
def test_update_statistics_needs_the_rows_of_every_statistics_block():
    """KFAC (A and G) and K-BFGS (A only) both need a record; the message names the layer."""
    for make in (KFAC, KBFGS):
        opt = make(_two_linear(), lr=0.1)
        grads = {n: s.adapter.grad_matrix() for n, s in opt.slots.items()}
        with pytest.raises(RuntimeError, match=_exact(NO_STATS.format("0"))):
            opt._update_statistics({}, grads)


def test_update_statistics_of_a_gradient_diagonal_needs_no_record():
    """diagonal_block(source="gradient"): the statistic is the squared gradient matrix, no rows needed."""
    opt = CurvatureOptimizer(_two_linear(), lr=0.1, blocks={nn.Linear: diagonal_block(source="gradient")})
    grads = {"0": torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=D), "1": torch.ones(2, 3, dtype=D)}
    opt._update_statistics({}, grads)
    assert torch.equal(opt.blocks["0"].v, torch.tensor([[1.0, 4.0, 9.0], [1.0, 0.25, 0.0]], dtype=D))
    assert torch.equal(opt.blocks["1"].v, torch.ones(2, 3, dtype=D))


def test_refresh_inverses_sets_the_recovery_counter():
    opt = KFAC(_two_linear(), lr=0.1)
    opt.counters["inversion_recoveries"] = 5
    opt.inversion_stats.recovered = 3
    for s in opt.blocks.values():
        s.a_factor.F.copy_(torch.eye(3, dtype=D))
        s.g_factor.F.copy_(torch.eye(2, dtype=D))
    opt._refresh_inverses(opt._layer_settings())
    assert opt.counters["inversion_recoveries"] == 3 == opt.inversion_stats.recovered


def test_layerwise_inverses_come_from_each_layers_owner():
    """KFAC layerwise on two thread ranks: one broadcast of the inverses per owner, as on one process."""
    ranks, world = threaded(2, UNEQUAL2, "kfac", "layerwise", steps=2)
    assert_replicated(ranks)
    assert_matches(ranks[0]["params"], W.reference_run("kfac", steps=2)["params"])
    assert [(op, src) for op, src, *_ in world.log if op == "broadcast"] == [("broadcast", 0), ("broadcast", 1)] * 2


# ------------------------------------------------------------------ _kl_scale
def _kl(kl_clip: float, zero: bool = False) -> float:
    r"""Layer "0" (one lr 0.1): ⟨d, m⟩ = 6; layer "1" (lr_w 0.1, lr_b 0.2): ⟨d_W, m_W⟩ = 20, ⟨d_b, m_b⟩ = 6.
    v = 6·0.01 + 20·0.01 + 6·0.04 = 0.5."""
    opt = KFAC(_two_linear(), lr=0.1, kl_clip=kl_clip)
    settings = {"0": PartSettings(0.1, 0.1, 0.0, 0.0, 0.9, 1e-3), "1": PartSettings(0.1, 0.2, 0.0, 0.0, 0.9, 1e-3)}
    directions = {"0": torch.ones(2, 3, dtype=D), "1": torch.tensor([[1.0, 2.0, 1.0], [3.0, 4.0, 2.0]], dtype=D)}
    inputs = {"0": torch.ones(2, 3, dtype=D), "1": torch.tensor([[2.0, 2.0, 4.0], [2.0, 2.0, 1.0]], dtype=D)}
    if zero:
        directions = {n: torch.zeros_like(d) for n, d in directions.items()}
    return opt._kl_scale(settings, inputs, directions)


def test_kl_scale_sums_every_layer_and_part_with_its_learning_rate():
    """ν = √(c / v) = √(0.125 / 0.5) = 0.5."""
    assert _kl(0.125) == pytest.approx(0.5, rel=1e-14)
    assert _kl(0.02) == pytest.approx(0.2, rel=1e-14)


def test_kl_scale_is_at_most_one():
    assert _kl(1.0) == 1.0  # √(1 / 0.5) > 1


def test_kl_scale_of_a_zero_step_is_one():
    assert _kl(0.125, zero=True) == 1.0


# ------------------------------------------------------------------ _monte_carlo_fisher_pass
def test_monte_carlo_pass_needs_recorded_inputs():
    opt = KFAC(_two_linear(), lr=0.1, fisher="mc", likelihood="gaussian")
    with pytest.raises(RuntimeError, match=_exact(
            "the Monte-Carlo Fisher needs the model's inputs: no forward pass was recorded")):
        opt._monte_carlo_fisher_pass({}, [])


def test_monte_carlo_pass_records_the_sampled_gradients_of_each_micro_batch():
    """Gaussian, loss_reduction="sum": the sampled loss ½Σ(z − (z + ε))² has ∂L/∂z = −ε, not divided by the
    number of micro-batches (that is the mean convention). Each recorded call is replayed with its keyword
    arguments, the parameters get no gradient and the replay is not recorded as a new input."""
    torch.manual_seed(0)
    model = Shifted().to(D)
    opt = KFAC(model, lr=0.1, fisher="mc", likelihood="gaussian", loss_reduction="sum", seed=7)
    x1, x2 = torch.randn(2, 3, dtype=D), torch.randn(3, 3, dtype=D)
    g = torch.Generator().manual_seed(7)
    eps = torch.cat([torch.randn((2, 2), generator=g, dtype=D), torch.randn((3, 2), generator=g, dtype=D)])
    records = {"lin": LayerRecord(batch_size=5)}
    opt._monte_carlo_fisher_pass(records, [((x1,), {"shift": 1.0}), ((x2,), {"shift": 2.0})])
    torch.testing.assert_close(records["lin"].grad_rows, -eps, rtol=1e-14, atol=1e-15)
    assert records["lin"].grad_scale == 1.0
    assert all(p.grad is None for p in model.parameters())
    assert opt._inputs == [] and opt._batch_inputs == [] and opt._internal_pass is False
    assert opt.capture.records == {}


def test_monte_carlo_fisher_on_thread_ranks_draws_the_single_process_targets():
    """KFAC fisher="mc" on two thread ranks (rows 3 and 7 of each batch): the noise is drawn once for the
    global batch, so every step equals the one-process run."""
    ranks, _ = threaded(2, UNEQUAL2, "kfac_mc", "replicate", steps=3)
    assert_replicated(ranks)
    assert_matches(ranks[0]["params"], W.reference_run("kfac_mc", steps=3)["params"])
