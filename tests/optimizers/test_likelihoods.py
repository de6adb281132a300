"""Monte-Carlo targets from explicit noise: the same samples as the generator path, global-batch slices."""

from __future__ import annotations

import pytest
import torch

from optimizers.likelihoods import draw_noise, sampled_loss


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_noise_for_the_global_batch_sliced_per_rank_equals_the_one_process_draw(device, likelihood):
    z = torch.randn(10, 3, dtype=torch.float64, device=device, requires_grad=True)
    one = sampled_loss(z, likelihood, "sum", torch.Generator(device=device).manual_seed(4))
    noise = draw_noise(likelihood, z, 10, torch.Generator(device=device).manual_seed(4))
    parts = [sampled_loss(z[lo:hi], likelihood, "sum", noise=noise[lo:hi]) for lo, hi in ((0, 3), (3, 10))]
    torch.testing.assert_close(parts[0] + parts[1], one, rtol=1e-14, atol=1e-14)


def test_categorical_inverse_cdf_samples_the_softmax(device):
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64, device=device).expand(40000, 3)
    noise = draw_noise("categorical", logits, 40000, torch.Generator(device=device).manual_seed(1))
    # the loss of sampled class t is -log softmax(z)_t: recover t from the per-sample losses
    per_sample = []
    for lo in range(0, 40000, 10000):
        z = logits[lo:lo + 10000].clone().requires_grad_(True)
        loss = sampled_loss(z, "categorical", "sum", noise=noise[lo:lo + 10000])
        (grad,) = torch.autograd.grad(loss, z)
        per_sample.append(grad + torch.softmax(z.detach(), -1))  # = one-hot of the sampled class
    onehot = torch.cat(per_sample)
    freq = onehot.mean(0)
    p = torch.softmax(logits[0], -1)
    # 5 binomial standard errors
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / 40000)), (freq, p)


def test_noise_rows_must_match_the_batch():
    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match="rows"):
        sampled_loss(z, "gaussian", noise=torch.zeros(3, 2))
