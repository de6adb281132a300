r"""Sampling targets from a model's predictive distribution (for the Monte-Carlo Fisher).

For output :math:`z` and a target :math:`t \sim p(t\mid z)`, the gradient of
:math:`-\log p(t\mid z)` has covariance equal to the Fisher of the likelihood, so a backward pass of
this *sampled* loss gives per-sample pre-activation gradients whose outer products estimate the
true Fisher's G factor (Martens & Grosse 2015).

* ``"bernoulli"``: :math:`t \sim \operatorname{Bernoulli}(\sigma(z))`, loss = BCE-with-logits;
* ``"gaussian"``: :math:`t = z + \varepsilon`, :math:`\varepsilon\sim N(0, I)`, loss = :math:`\frac12\|z - t\|^2`;
* ``"categorical"``: :math:`t \sim \operatorname{softmax}(z)` over dim 1, loss = cross-entropy.

The per-sample loss sums over all non-batch dimensions; ``reduction="mean"`` averages over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian", "categorical")


def draw_noise(likelihood: str, output: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The randomness :func:`sampled_loss` uses, drawn for ``n`` samples shaped like ``output``'s samples.

    Uniforms :math:`u \sim U[0, 1)` per element (Bernoulli: :math:`t = [u < \sigma(z)]`), standard
    normals per element (Gaussian), one uniform per sample and location (categorical, inverse CDF).
    For Bernoulli and Gaussian, ``draw_noise(..., N)`` is exactly what :func:`sampled_loss` draws
    from ``generator`` for a batch of ``N``; data-parallel ranks draw it once for the global batch
    and each take their rows, so the samples equal a single process's.
    """
    if likelihood == "bernoulli":
        return torch.rand((n, *output.shape[1:]), generator=generator, device=output.device, dtype=output.dtype)
    if likelihood == "gaussian":
        return torch.randn((n, *output.shape[1:]), generator=generator, device=output.device, dtype=output.dtype)
    if likelihood == "categorical":
        return torch.rand((n, *output.shape[2:]), generator=generator, device=output.device, dtype=output.dtype)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def sampled_loss(output: torch.Tensor, likelihood: str, reduction: str = "mean",
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of ``output`` against targets sampled from its own predictive distribution.

    ``noise`` (from :func:`draw_noise`, one row per sample of ``output``) replaces the draw from
    ``generator``.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the Monte-Carlo Fisher needs the model to return one tensor, got {type(output).__name__}")
    z = output
    if noise is not None and noise.shape[0] != z.shape[0]:
        raise ValueError(f"noise has {noise.shape[0]} rows for an output of {z.shape[0]} samples")
    with torch.no_grad():
        if likelihood == "bernoulli":
            probs = torch.sigmoid(z.detach())
            u = noise if noise is not None else torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            target = (u < probs).to(z.dtype)
        elif likelihood == "gaussian":
            eps = noise if noise is not None else torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            target = z.detach() + eps
        elif likelihood == "categorical":
            logits = z.detach().movedim(1, -1).reshape(-1, z.shape[1])
            probs = torch.softmax(logits, -1)
            if noise is None:
                idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:  # inverse CDF of each row at its uniform
                cdf = probs.cumsum(-1)
                idx = torch.searchsorted(cdf, noise.reshape(-1, 1).to(cdf)).squeeze(-1).clamp_(max=z.shape[1] - 1)
            target = idx.reshape(*z.movedim(1, -1).shape[:-1])
        else:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if likelihood == "bernoulli":
        per_element = F.binary_cross_entropy_with_logits(z, target, reduction="none")
    elif likelihood == "gaussian":
        per_element = 0.5 * (z - target) ** 2
    else:
        per_element = F.cross_entropy(z, target, reduction="none")
    per_sample = per_element.reshape(z.shape[0], -1).sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()
