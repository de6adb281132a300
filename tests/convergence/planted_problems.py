"""Entry points for ``python -m convergence check --problem planted_problems:NAME``: honest problems and
planted violations of the SQN assumptions, each returning the dict the CLI accepts (model, loss_fn, data,
make_optimizer, and optionally make_closure, make_loader, batch_size, lipschitz).

Every planted violation changes one thing a real pipeline could get wrong; the tests in
``test_planted.py`` run them through :func:`convergence.cli.main` and require the matching check to FAIL.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

from convergence import problems
from convergence.monitor import iid_loader, theory_mode_kwargs
from optimizers import KBFGS, KBFGSL, KFAC

BATCH = 16


def _least_squares(n: int = 256, d: int = 5, seed: int = 0):
    return problems.least_squares(n=n, d=d, seed=seed)


def _kbfgsl(lr: float = 0.05):
    return lambda model: KBFGSL(model, lr=lr, damping=0.3, **theory_mode_kwargs())


def _standard_closure(problem, optimizer, transform=None):
    def make(batch):
        x, y = batch

        def closure():
            optimizer.zero_grad()
            loss = problem.loss_fn(problem.model(x), y)
            loss.backward()
            if transform is not None:
                with torch.no_grad():
                    for i, p in enumerate(problem.model.parameters()):
                        if p.grad is not None:  # K-BFGS's pass at the new point freezes the parameters
                            transform(i, p)
            return loss

        return closure

    return make


# ------------------------------------------------------------------------------------------ honest
def honest():
    """K-BFGS(L) on least squares: nothing planted."""
    prob = _least_squares()
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kbfgsl(),
            "lipschitz": prob.lipschitz, "batch_size": BATCH}


def _kfac(lr: float = 0.3):
    return lambda model: KFAC(model, lr=lr, damping=1.0, **theory_mode_kwargs())


def honest_kfac():
    """KFAC (damping 1) on least squares with the exact L: lr 0.3 is inside kappa_lo/(L kappa_hi^2)."""
    prob = _least_squares()
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kfac(),
            "lipschitz": prob.lipschitz, "batch_size": BATCH}


def repeated_batches_kfac():
    """E8p: as ``repeated_batches``, with the honest_kfac optimizer (inside the step-size condition)."""
    prob = _least_squares()

    def make_loader(seed: int, batch_size: int, num_batches: int):
        return _repeated_loader(prob.dataset, batch_size, seed, num_batches)

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kfac(),
            "make_loader": make_loader, "batch_size": BATCH, "lipschitz": prob.lipschitz}


def identical_examples():
    """Every example is the same: sigma_1^2 = 0, so E3 cannot tell batch sizes apart (NOT_APPLICABLE)."""
    prob = _least_squares()
    x, y = prob.dataset.tensors
    data = TensorDataset(x[:1].repeat(x.shape[0], 1), y[:1].repeat(y.shape[0], 1))
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": data, "make_optimizer": _kbfgsl(),
            "batch_size": BATCH}


# ------------------------------------------------------------------------------------------ planted
class RepeatedExampleSampler(Sampler):
    """Each batch is one uniformly drawn example repeated ``batch_size`` times (not i.i.d. draws)."""

    def __init__(self, n: int, batch_size: int, batches: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.batches, self.generator = n, batch_size, batches, generator

    def __iter__(self):
        for _ in range(self.batches):
            i = int(torch.randint(self.n, (1,), generator=self.generator))
            yield [i] * self.batch_size

    def __len__(self) -> int:
        return self.batches


def _repeated_loader(dataset, batch_size: int, seed: int, batches: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_sampler=RepeatedExampleSampler(len(dataset), batch_size, batches, gen))


def repeated_batches():
    """E3 / E8p: the loader repeats one example per batch, so the noise does not shrink as 1/m."""
    prob = _least_squares()

    def make_loader(seed: int, batch_size: int, num_batches: int):
        return _repeated_loader(prob.dataset, batch_size, seed, num_batches)

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kbfgsl(0.02),
            "make_loader": make_loader, "batch_size": BATCH, "lipschitz": prob.lipschitz}


def biased_closure():
    """E2: the training closure adds a constant to every gradient (e.g. a stale regularizer term)."""
    prob = _least_squares()
    shifts: dict[int, torch.Tensor] = {}

    def shift(i, p):
        if i not in shifts:
            gen = torch.Generator().manual_seed(100 + i)
            shifts[i] = 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad.add_(shifts[i].to(p.device))

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kbfgsl(0.01),
            "make_closure": lambda opt: _standard_closure(prob, opt, shift), "batch_size": 64}


def ascent_closure():
    """E6: the closure hands the optimizer the negated gradient, so the loss rises on average."""
    prob = _least_squares()

    def negate(i, p):
        p.grad.neg_()

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kbfgsl(0.01),
            "make_closure": lambda opt: _standard_closure(prob, opt, negate), "batch_size": BATCH,
            "lipschitz": prob.lipschitz}


def indefinite_when_applied():
    """E4: K-BFGS whose H_a is honest as stored (to_dense) but applied with one direction reversed."""
    prob = _least_squares()

    def make(model):
        opt = KBFGS(model, lr=0.01, damping=0.3, **theory_mode_kwargs())
        factor = opt.blocks[""].a_factor
        honest_apply = factor.apply

        def flipped(V):
            H = factor.to_dense()
            u = torch.zeros(H.shape[0], dtype=H.dtype, device=H.device)
            u[0] = 1.0
            return honest_apply(V) - 2.0 * float(u @ H @ u) * torch.outer(u, u @ V) if V.dim() == 2 else \
                honest_apply(V) - 2.0 * float(u @ H @ u) * u * (u @ V)

        factor.apply = flipped
        return opt

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": make,
            "batch_size": BATCH}


def current_batch_preconditioner():
    """E5: KFAC that folds the current batch into its factors (and inverts them) before the step."""
    prob = _least_squares()

    def make(model):
        return KFAC(model, lr=0.05, damping=0.3, momentum=0.0, weight_decay=0.0, lag_factors=False,
                    inverse_update_freq=1)

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": make,
            "batch_size": BATCH}


def wrong_gradient():
    """E1: a custom loss whose gradient is three times its derivative (``loss + 2 (loss - loss.detach())``
    has the loss's value and three times its gradient): gradients disagree with the loss values."""
    prob = _least_squares()

    def loss_fn(z, t):
        base = prob.loss_fn(z, t)
        return base + 2.0 * (base - base.detach())

    return {"model": prob.model, "loss_fn": loss_fn, "data": prob.dataset, "make_optimizer": _kbfgsl(0.01),
            "batch_size": BATCH}


def adam():
    """A plain torch.optim optimizer (no curvature blocks): E4/E5/E7a/E7d are NOT_APPLICABLE."""
    prob = _least_squares()
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset,
            "make_optimizer": lambda m: torch.optim.Adam(m.parameters(), lr=0.01), "batch_size": BATCH,
            "lipschitz": prob.lipschitz}


def fixed_loader():
    """The user's own DataLoader is the training loader (E8p cannot draw batches of 4m)."""
    prob = _least_squares()
    loader = iid_loader(prob.dataset, BATCH, torch.Generator().manual_seed(0), num_samples=BATCH * 1000)
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": loader, "make_optimizer": _kbfgsl(0.05)}


# ------------------------------------------------------------------------------ E7d / E8 / E8p
def _isotropic(noise: float = 1.0):
    """f(w) = 1/2 |w - w*|^2 + c in 8 dimensions (X^T X / N = I exactly, L = 1), 256 examples with label noise 1:
    gradient noise dominates near w*, so a constant step reaches its noise floor within a few dozen steps."""
    return problems.quadratic([1.0] * 8, samples_per_dim=32, noise=noise, seed=0)


def _kfac_big(lr: float = 1500.0, damping: float = 1e4):
    """KFAC whose damping dominates the factors: P ~ 1e-4 I (kappa_lo/kappa_hi ~ 0.99), so the step-size limit
    kappa_lo/(L kappa_hi^2) is ~ 8e3 and lr 1500 gives alpha lambda(P H) ~ 0.15 per step."""
    return lambda model: KFAC(model, lr=lr, damping=damping, **theory_mode_kwargs())


def noisy_quadratic():
    """E8 / E8p honest: constant step inside the step-size condition, the exact L declared, i.i.d. batches."""
    prob = _isotropic()
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset,
            "make_optimizer": _kfac_big(), "lipschitz": prob.lipschitz, "batch_size": BATCH}


def noisy_quadratic_repeated():
    """E8p: as ``noisy_quadratic``, but every batch repeats one example: the batch noise does not shrink with m."""
    prob = _isotropic()

    def make_loader(seed: int, batch_size: int, num_batches: int):
        return _repeated_loader(prob.dataset, batch_size, seed, num_batches)

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset,
            "make_optimizer": _kfac_big(), "make_loader": make_loader, "lipschitz": prob.lipschitz, "batch_size": BATCH}


def understated_lipschitz():
    """E7d: the declared L is 0.7 of the true curvature (a few power iterations, whose Rayleigh quotients approach
    lambda_max from below), and lr = 13000 sits inside kappa_lo/(L kappa_hi^2) for that L (about 1.6e4 here), but
    alpha lambda_max(P H) = 1.18 > kappa_lo/kappa_hi = 0.99."""
    prob = _isotropic()
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset,
            "make_optimizer": _kfac_big(lr=13000.0), "lipschitz": 0.7 * prob.lipschitz, "batch_size": BATCH}


def clipped_gradients():
    """E8: the closure clips the gradient norm to 1e-3 (``clip_grad_norm_``) before the step: the loss decreases
    far slower than the theorem's bound demands (step size and preconditioner unchanged)."""
    prob = _isotropic()
    model = prob.model

    def make_closure(optimizer):
        def make(batch):
            x, y = batch

            def closure():
                optimizer.zero_grad()
                loss = prob.loss_fn(model(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
                return loss

            return closure

        return make

    return {"model": model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kfac_big(),
            "make_closure": make_closure, "lipschitz": prob.lipschitz, "batch_size": BATCH}


# ------------------------------------------------------------------------------ E6.form / E7c
def momentum_step():
    """E6.form: K-BFGS(L) with heavy-ball momentum 0.9 left on (the library default outside theory mode): the
    displacement is no longer -alpha H_k g_k."""
    prob = _least_squares()
    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset,
            "make_optimizer": lambda model: KBFGSL(model, lr=0.01, damping=0.3, momentum=0.9, weight_decay=0.0,
                                                   lag_factors=True),
            "lipschitz": prob.lipschitz, "batch_size": BATCH}


def ragged_batches():
    """E7c: the loader keeps the last, smaller batch of each pass (``drop_last=False`` over 40 draws with batch 16):
    batch sizes 16, 16, 8, 16, 16, 8, ..."""
    prob = _least_squares()

    def make_loader(seed: int, batch_size: int, num_batches: int):
        gen = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(prob.dataset, replacement=True, num_samples=40, generator=gen)
        return DataLoader(prob.dataset, batch_size=batch_size, sampler=sampler, drop_last=False)

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": _kbfgsl(0.01),
            "make_loader": make_loader, "lipschitz": prob.lipschitz, "batch_size": BATCH}


def current_batch_only_preconditioner():
    """E5c: KFAC whose factors are the current batch alone (factor_decay 0, no lag, small damping): H(xi) and g(xi)
    are strongly correlated, so E[H g] - E[H] grad f is large enough to detect with R batches."""
    prob = _least_squares()

    def make(model):
        return KFAC(model, lr=0.02, damping=0.01, momentum=0.0, weight_decay=0.0, lag_factors=False,
                    factor_decay=0.0, inverse_update_freq=1, inverse_warmup_steps=0)

    return {"model": prob.model, "loss_fn": prob.loss_fn, "data": prob.dataset, "make_optimizer": make,
            "batch_size": 8}
