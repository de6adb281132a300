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


def sampled_loss(output: torch.Tensor, likelihood: str, reduction: str = "mean",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The loss of ``output`` against targets sampled from its own predictive distribution."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the Monte-Carlo Fisher needs the model to return one tensor, got {type(output).__name__}")
    z = output
    with torch.no_grad():
        if likelihood == "bernoulli":
            probs = torch.sigmoid(z.detach())
            target = (torch.rand(z.shape, generator=generator, device=z.device, dtype=z.dtype) < probs).to(z.dtype)
        elif likelihood == "gaussian":
            target = z.detach() + torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        elif likelihood == "categorical":
            logits = z.detach().movedim(1, -1).reshape(-1, z.shape[1])
            idx = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
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
