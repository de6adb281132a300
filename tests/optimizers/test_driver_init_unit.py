"""``CurvatureOptimizer.__init__``, exactly: its documented defaults and each argument's rejection.

Oracles (not the code itself):

* The defaults of the public signature (what ``help(CurvatureOptimizer)`` shows; ``fallback_lr`` and
  ``fallback_betas`` default to None as the class docstring states), transcribed by hand in
  ``DOCUMENTED``: a default-constructed optimizer exposes exactly these settings, and, argument by
  argument, omitting it behaves bit-identically to passing its documented value explicitly (three
  steps of a small float64 problem with a fallback layer). Defaults observable only through behaviour
  are tested by behaviour: ``seed=0`` gives the same Monte-Carlo Fisher draws as an explicit
  ``seed=0`` (and differs from ``seed=1``); ``curvature_update_freq=1`` refreshes the statistics at
  every step.
* Every rejected argument raises its full message (anchored ``^...$``), and the value at each
  boundary on the allowed side is accepted: ``lr`` in (0, inf), ``momentum`` in [0, 1),
  ``weight_decay`` in [0, inf), the update frequencies integers >= 1, the warm-up an integer >= 0,
  ``kl_clip`` in (0, inf), the string options from their documented sets.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import torch
from torch import nn

from curvature.damping import AdaptiveLM, Tikhonov
from optimizers import CurvatureOptimizer, diagonal_block, kbfgsl_block, kfac_block
from optimizers.communicator import LocalCommunicator
from optimizers.recovery import Recovery
from tests.optimizers.test_communicator_threads import gloo_group  # noqa: F401  (fixture)
from tests.optimizers.test_tied_weights import TiedPair
from tests.optimizers.test_tied_weights import _data as tied_data
from tests.optimizers.test_tied_weights import _loss as tied_loss

D = torch.float64

# The signature's keyword defaults, transcribed by hand from the documented API.
DOCUMENTED: dict[str, Any] = {
    "damping": 1e-3, "momentum": 0.9, "weight_decay": 0.0, "curvature_update_freq": 1,
    "inverse_update_freq": 1, "inverse_warmup_steps": 0, "fallback": "sgd", "fallback_lr": None,
    "fallback_betas": None, "fallback_eps": 1e-8, "loss_reduction": "mean", "lag_factors": False,
    "require_closure": False, "fisher": "empirical", "likelihood": None, "kl_clip": None,
    "inverse_method": "cholesky", "seed": 0, "param_groups": None, "exclude": (), "recovery": None,
    "strict": False, "distributed": None, "distribute": "replicate",
}


def _model() -> nn.Sequential:
    """Linear(4, 5) → LayerNorm(5) (fallback rule) → Tanh → Linear(5, 2), float64, fixed init."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).to(D)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=D), torch.randn(8, 2, generator=g, dtype=D)


def _build(model: nn.Module | None = None, lr: float = 0.1, blocks: Any = None, **kwargs: Any) -> CurvatureOptimizer:
    model = _model() if model is None else model
    return CurvatureOptimizer(model, lr, {nn.Linear: kfac_block()} if blocks is None else blocks, **kwargs)


def _trajectory(opt: CurvatureOptimizer, steps: int = 3) -> list[torch.Tensor]:
    """The parameters after each of ``steps`` steps on the squared error ½‖f(x) − y‖² (batch mean)."""
    x, y = _data()
    out = []
    for _ in range(steps):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = 0.5 * ((opt.model(x) - y) ** 2).sum(1).mean()
            loss.backward()
            return loss
        opt.step(closure)
        out.append(torch.cat([p.detach().flatten().clone() for p in opt.model.parameters()]))
    return out


def _settings(opt: CurvatureOptimizer) -> dict[str, Any]:
    """Every setting the optimizer exposes publicly (the group's keys and the constructor's attributes)."""
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    return {
        "group": group, "damping_type": type(opt.damping).__name__, "damping": opt.damping.damping,
        "momentum": opt.momentum, "weight_decay": opt.weight_decay,
        "curvature_update_freq": opt.curvature_update_freq, "inverse_update_freq": opt.inverse_update_freq,
        "inverse_warmup_steps": opt.inverse_warmup_steps, "fallback": opt.fallback,
        "loss_reduction": opt.loss_reduction, "lag_factors": opt.lag_factors, "fisher": opt.fisher,
        "likelihood": opt.likelihood, "kl_clip": opt.kl_clip, "inverse_method": opt.inverse_method,
        "require_closure": opt.require_closure, "exclude": opt.exclude, "strict": opt.strict,
        "recovery": opt.recovery, "comm": type(opt.data_parallel.comm).__name__,
        "distribute": opt.data_parallel.distribute, "dp_loss_reduction": opt.data_parallel.loss_reduction,
        "capture_loss_reduction": opt.capture.loss_reduction, "fallback_modules": sorted(opt.fallback_modules),
        "slots": sorted(opt.slots),
    }


# ------------------------------------------------------------------ documented defaults
def test_the_transcription_matches_the_public_signature():
    """Guards the hand-written table against the signature (mutmut keeps the original signature)."""
    params = inspect.signature(CurvatureOptimizer.__init__).parameters
    assert {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty} == DOCUMENTED


def test_a_default_constructed_optimizer_has_the_documented_settings():
    opt = _build()
    assert _settings(opt) == {
        "group": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "damping": 1e-3, "fallback_lr": None,
                  "fallback_betas": None, "fallback_eps": 1e-8},
        "damping_type": "Tikhonov", "damping": 1e-3, "momentum": 0.9, "weight_decay": 0.0,
        "curvature_update_freq": 1, "inverse_update_freq": 1, "inverse_warmup_steps": 0, "fallback": "sgd",
        "loss_reduction": "mean", "lag_factors": False, "fisher": "empirical", "likelihood": None,
        "kl_clip": None, "inverse_method": "cholesky", "require_closure": False, "exclude": [],
        "strict": False, "recovery": Recovery(), "comm": "LocalCommunicator", "distribute": "replicate",
        "dp_loss_reduction": "mean", "capture_loss_reduction": "mean", "fallback_modules": ["1"],
        "slots": ["0", "3"],
    }
    assert opt.steps == 0 and opt.counters["steps"] == 0


@pytest.mark.parametrize("name", [n for n in DOCUMENTED if n not in ("param_groups", "exclude", "distributed")])
def test_omitting_an_argument_is_passing_its_documented_default(name):
    """Same settings and bit-identical steps with and without ``name=DOCUMENTED[name]``."""
    implicit, explicit = _build(), _build(**{name: DOCUMENTED[name]})
    assert _settings(implicit) == _settings(explicit)
    for a, b in zip(_trajectory(implicit), _trajectory(explicit)):
        assert torch.equal(a, b)


def _mc_trajectory(**kwargs: Any) -> list[torch.Tensor]:
    """Steps with the Monte-Carlo Fisher (Gaussian likelihood): G comes from sampled targets."""
    return _trajectory(_build(fisher="mc", likelihood="gaussian", **kwargs))


def test_the_default_seed_is_zero():
    """The optimizer's own generator drives the MC draws: the default gives seed 0's steps, not seed 1's."""
    default, zero, one = _mc_trajectory(), _mc_trajectory(seed=0), _mc_trajectory(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(default, zero))
    assert not torch.equal(default[-1], one[-1])


def test_the_default_curvature_update_freq_refreshes_statistics_every_step():
    """T_cov = 1: every step is the same as an explicit 1, and differs from T_cov = 2 after step 1."""
    default, two = _trajectory(_build()), _trajectory(_build(curvature_update_freq=2))
    assert torch.equal(default[0], two[0]) and not torch.equal(default[1], two[1])


def test_the_default_does_not_require_a_closure_for_kfac():
    model = _model()
    x, y = _data()
    opt = _build(model)
    (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
    opt.step()
    assert opt.counters["steps"] == 1


def test_blocks_that_need_a_second_pass_require_a_closure():
    assert _build(blocks={nn.Linear: kbfgsl_block(memory=2)}).require_closure is True
    assert _build(require_closure=True).require_closure is True


def test_damping_is_a_tikhonov_of_the_given_number_and_a_policy_is_used_as_given():
    assert _build(damping=0.25).damping.damping == 0.25 and _build(damping=0.25).param_groups[0]["damping"] == 0.25
    policy = Tikhonov(0.5)
    assert _build(damping=policy).damping is policy


# ------------------------------------------------------------------ rejections, full messages
def _rejects(exc: type[Exception], message: str, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        _build(*args, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0}, "lr must be a finite number in (0.0, inf), got 0"),
    ({"lr": -0.5}, "lr must be a finite number in (0.0, inf), got -0.5"),
    ({"lr": float("inf")}, "lr must be a finite number in (0.0, inf), got inf"),
    ({"lr": True}, "lr must be a finite number in (0.0, inf), got True"),
    ({"momentum": 1.0}, "momentum must be a finite number in [0.0, 1.0), got 1.0"),
    ({"momentum": -0.1}, "momentum must be a finite number in [0.0, 1.0), got -0.1"),
    ({"weight_decay": -1e-9}, "weight_decay must be a finite number in [0.0, inf), got -1e-09"),
    ({"curvature_update_freq": 0}, "curvature_update_freq must be an integer >= 1, got 0"),
    ({"curvature_update_freq": 1.0}, "curvature_update_freq must be an integer >= 1, got 1.0"),
    ({"inverse_update_freq": 0}, "inverse_update_freq must be an integer >= 1, got 0"),
    ({"inverse_update_freq": True}, "inverse_update_freq must be an integer >= 1, got True"),
    ({"inverse_warmup_steps": -1}, "inverse_warmup_steps must be an integer >= 0, got -1"),
    ({"fallback": "lbfgs"}, "fallback must be one of ('sgd', 'adam', 'error'), got 'lbfgs'"),
    ({"loss_reduction": "none"}, "loss_reduction must be 'mean' or 'sum', got 'none'"),
    ({"fisher": "true"}, "fisher must be 'empirical' or 'mc', got 'true'"),
    ({"fisher": "mc"}, "fisher='mc' needs likelihood in ('bernoulli', 'gaussian', 'categorical'), got None"),
    ({"fisher": "mc", "likelihood": "poisson"},
     "fisher='mc' needs likelihood in ('bernoulli', 'gaussian', 'categorical'), got 'poisson'"),
    ({"kl_clip": 0.0}, "kl_clip must be a finite number in (0.0, inf), got 0.0"),
    ({"kl_clip": float("nan")}, "kl_clip must be a finite number in (0.0, inf), got nan"),
    ({"inverse_method": "svd"}, "inverse_method must be 'cholesky' or 'eigh', got 'svd'"),
    ({"distribute": "sharded"}, "distribute must be one of ('replicate', 'layerwise'), got 'sharded'"),
])
def test_a_bad_argument_raises_its_full_message(kwargs, message):
    kwargs = dict(kwargs)  # the parameter is shared by every run of the test: never pop from it
    lr = kwargs.pop("lr", 0.1)
    _rejects(ValueError, message, lr=lr, **kwargs)


def test_the_checks_run_in_the_documented_order():
    """Several bad arguments: the first in signature order (lr, then momentum, ...) is reported."""
    _rejects(ValueError, "lr must be a finite number in (0.0, inf), got 0", lr=0, momentum=2.0, fallback="x")
    _rejects(ValueError, "momentum must be a finite number in [0.0, 1.0), got 2.0", momentum=2.0,
             weight_decay=-1.0)
    _rejects(ValueError, "fallback must be one of ('sgd', 'adam', 'error'), got 'x'", fallback="x",
             loss_reduction="x")


@pytest.mark.parametrize("kwargs", [
    {"lr": 1e-300}, {"momentum": 0.0}, {"momentum": 0.999999}, {"weight_decay": 0.0},
    {"curvature_update_freq": 1}, {"inverse_update_freq": 1}, {"inverse_warmup_steps": 0},
    {"kl_clip": 1e-300}, {"fallback": "adam"}, {"fallback": "error", "exclude": []},
    {"loss_reduction": "sum"}, {"fisher": "mc", "likelihood": "gaussian"}, {"inverse_method": "eigh"},
    {"distribute": "layerwise"},
])
def test_the_values_at_each_boundary_are_accepted(kwargs):
    """Accepted and stored as given (the fallback "error" needs a model without fallback layers)."""
    kwargs = dict(kwargs)  # the parameter is shared by every run of the test: never pop from it
    lr = kwargs.pop("lr", 0.1)
    model = _model()
    if kwargs.get("fallback") == "error":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)
    opt = _build(model, lr=lr, **kwargs)
    assert opt.param_groups[0]["lr"] == lr
    for key, value in kwargs.items():
        if key == "distribute":
            assert opt.data_parallel.distribute == value
        elif key == "exclude":
            assert opt.exclude == value
        else:
            assert getattr(opt, key) == value


def test_a_sum_loss_reduction_reaches_the_capture_and_the_data_parallel_helper():
    opt = _build(loss_reduction="sum")
    assert (opt.loss_reduction, opt.capture.loss_reduction, opt.data_parallel.loss_reduction) == ("sum",) * 3


def test_a_non_module_model_is_a_type_error():
    with pytest.raises(TypeError, match=r"^model must be an nn\.Module, got list$"):
        CurvatureOptimizer([nn.Linear(2, 2)], 0.1, {nn.Linear: kfac_block()})


def test_blocks_must_be_a_mapping():
    _rejects(TypeError, "blocks must be a mapping from module types or layer names to recipes",
             blocks=[(nn.Linear, kfac_block())])


@pytest.mark.parametrize("exclude", ["1", ["1", 3]])
def test_exclude_must_be_a_list_of_strings(exclude):
    _rejects(TypeError, "exclude must be a list of layer names or glob patterns, e.g. ['head', '*.norm*']",
             exclude=exclude)


def test_exclude_is_kept_as_a_list():
    opt = _build(exclude=("0",))
    assert opt.exclude == ["0"] and sorted(opt.fallback_modules) == ["0", "1"] and sorted(opt.slots) == ["3"]


def test_a_model_without_trainable_parameters_is_rejected():
    model = _model().requires_grad_(False)
    _rejects(ValueError, "the model has no trainable parameters", model)


def test_a_policy_needing_a_quadratic_model_rejects_blocks_without_one():
    _rejects(ValueError, "AdaptiveLM needs blocks with a quadratic model; ['0', '3'] have none",
             blocks={nn.Linear: kbfgsl_block(memory=2)}, damping=AdaptiveLM(1.0))
    assert _build(damping=AdaptiveLM(1.0)).damping.needs_reduction_ratio is True  # K-FAC blocks have one


def test_strict_and_lag_factors_are_stored_as_bools():
    opt = _build(strict=1, lag_factors=1, require_closure=1)
    assert (opt.strict, opt.lag_factors, opt.require_closure) == (True, True, True)


def test_a_one_process_optimizer_uses_a_local_communicator():
    for distributed in (None, False):
        assert isinstance(_build(distributed=distributed).data_parallel.comm, LocalCommunicator)
    comm = LocalCommunicator()
    assert _build(distributed=comm).data_parallel.comm is comm


# ------------------------------------------------------------------ state at construction
def test_the_counters_start_at_zero_with_the_documented_keys():
    """The class docstring's counters (plus ``chunked_layers``) at zero; the step scale starts at 1
    (no recovery has shrunk the step yet), with no skip reasons."""
    assert _build().counters == {
        "steps": 0, "skipped_steps": 0, "reverted_steps": 0, "skip_reasons": {}, "rollbacks": 0,
        "recoveries": 0, "secant_resets": 0, "inversion_recoveries": 0, "step_scale": 1.0,
        "bad_point_streak": 0, "runtime_fallbacks": 0, "chunked_layers": 0,
    }


def test_two_bad_first_passes_before_any_accepted_step_have_no_point_to_roll_back_to():
    """A NaN loss on finite inputs twice from the start: the second is the point's fault, but no step was
    ever accepted, so nothing is rolled back (the parameters stay at their initial values)."""
    opt = _build()
    x, y = _data()
    start = [p.detach().clone() for p in opt.model.parameters()]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * ((opt.model(x) - y) ** 2).sum(1).mean() * float("nan")
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    counters = opt.counters
    assert (counters["skipped_steps"], counters["bad_point_streak"], counters["rollbacks"], counters["recoveries"]) == (2, 2, 0, 0)
    assert all(torch.equal(p, q) for p, q in zip(opt.model.parameters(), start))


def test_freezing_a_parameter_right_after_construction_is_reported_at_the_first_step():
    opt = _build()
    x, y = _data()
    opt.model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="^" + re.escape(
            "a parameter of layer '0' was frozen (requires_grad=False) after the optimizer was built; the optimizer "
            "cannot follow a changed model: build a new optimizer after changing the model (or add new parameters "
            "with add_param_group) (or set its group's lr to 0 to keep it fixed)") + "$"):
        opt.step(lambda: (0.5 * ((opt.model(x) - y) ** 2).sum(1).mean()))


# ------------------------------------------------------------------ group settings at construction
@pytest.mark.parametrize("kwargs, message", [
    ({"fallback_eps": 0.0}, "the constructor['fallback_eps'] must be a finite number > 0, got 0.0"),
    ({"fallback_lr": -1.0}, "the constructor['fallback_lr'] must be None or a finite number >= 0, got -1.0"),
    ({"fallback_betas": (0.9, 1.0)},
     "the constructor['fallback_betas'] must be None or a pair (beta1, beta2) of numbers in [0, 1), got (0.9, 1.0)"),
])
def test_the_fallback_settings_are_checked_as_the_constructors_group(kwargs, message):
    _rejects(ValueError, message, **kwargs)


def test_a_bad_param_group_value_names_its_group():
    model = _model()
    groups = [{"params": model[0].parameters()}, {"params": list(model[1].parameters()) + list(model[3].parameters()),
                                                   "weight_decay": -0.5}]
    _rejects(ValueError, "param_groups[1]['weight_decay'] must be a finite number >= 0, got -0.5", model,
             param_groups=groups)


def test_each_block_is_built_with_the_damping_of_its_weights_group():
    """The recipe's context carries the group's ``damping`` (the constructor's when the group has none)."""
    seen: dict[str, float] = {}
    inner = kfac_block()

    def recording(name, adapter, ctx):
        seen[name] = ctx.damping
        return inner(name, adapter, ctx)

    model = _model()
    groups = [{"params": model[0].parameters(), "damping": 0.5},
              {"params": list(model[1].parameters()) + list(model[3].parameters())}]
    _build(model, blocks={nn.Linear: recording}, damping=0.2, param_groups=groups)
    assert seen == {"0": 0.5, "3": 0.2}


# ------------------------------------------------------------------ tied weights
def test_a_tied_pair_feeds_both_calls_into_its_one_block():
    """A K-FAC block (decay 0) of a fully tied pair: A = (1/N) Σ over both calls' rows of [x, 1][x, 1]ᵀ."""
    torch.manual_seed(0)
    pair = TiedPair().to(D)
    x1, x2, c, sign = tied_data("cpu")
    opt = CurvatureOptimizer(pair, 0.1, {nn.Linear: kfac_block(decay=0.0)}, momentum=0.0)
    assert list(opt.slots) == ["a"] and [n for n, _ in opt.slots["a"].shared] == ["b"]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = tied_loss(pair, x1, x2, c, sign)
        loss.backward()
        return loss

    opt.step(closure)
    rows = torch.cat([torch.cat([x1, x2]), torch.ones(2 * len(x1), 1, dtype=D)], 1)
    torch.testing.assert_close(opt.blocks["a"].a_factor.statistic, rows.T @ rows / len(x1))


def test_a_tied_pair_with_an_uncaptured_block_is_not_hooked():
    """A squared-gradient diagonal block reads no captured rows: the tie needs no shared capture."""
    pair = TiedPair().to(D)
    opt = CurvatureOptimizer(pair, 0.1, {nn.Linear: diagonal_block(source="gradient")})
    assert list(opt.slots) == ["a"] and [n for n, _ in opt.slots["a"].shared] == ["b"]
    assert "a" not in opt.capture.layers


# ------------------------------------------------------------------ a DistributedDataParallel model
def test_a_ddp_model_is_unwrapped_and_its_second_pass_runs_without_gradient_sync(gloo_group):  # noqa: F811
    """The optimizer works on the wrapped module (its layer names), over the model's group, and
    K-BFGS's internal second pass runs under ``no_sync`` (only the user's pass all-reduces)."""
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = CurvatureOptimizer(ddp, 0.1, {nn.Linear: kbfgsl_block(memory=2)}, fallback="adam")
    assert opt.model is model and sorted(opt.slots) == ["0", "3"] and sorted(opt.fallback_modules) == ["1"]
    assert opt.data_parallel.comm.group is ddp.process_group
    x, y = _data()
    syncing: list[bool] = []

    def closure() -> torch.Tensor:
        syncing.append(ddp.require_backward_grad_sync)
        opt.zero_grad()
        loss = 0.5 * ((ddp(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert syncing == [True, False] and opt.counters["steps"] == 1


def test_a_parameter_is_named_after_the_layer_that_owns_it_not_a_container_reusing_that_layer():
    """One Linear registered twice (``0`` and inside container ``2``): its weight belongs to layer ``0``."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4).to(D)
    model = nn.Sequential(lin, nn.Tanh(), nn.Sequential(lin))
    opt = _build(model)
    lin.weight.requires_grad_(False)
    x = torch.randn(3, 4, dtype=D)
    with pytest.raises(RuntimeError, match=r"^a parameter of layer '0' was frozen \(requires_grad=False\)"):
        opt.step(lambda: model(x).sum())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_mc_generator_lives_on_the_parameters_device():
    """Monte-Carlo draws on a CUDA model use a CUDA generator (a CPU one cannot sample CUDA tensors)."""
    model = _model().cuda()
    opt = CurvatureOptimizer(model, 0.1, {nn.Linear: kfac_block()}, fisher="mc", likelihood="gaussian")
    x, y = (t.cuda() for t in _data())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.counters["steps"] == 1
