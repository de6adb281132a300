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


# ------------------------------------------------------------------ exact values by hand
import math  # noqa: E402

D = torch.float64


def test_bernoulli_target_is_u_below_sigmoid_and_the_loss_is_bce(device):
    """σ(log 3) = 3/4: u = 0.5 → t = 1, loss −log(3/4); u = 0.8 → t = 0, loss −log(1/4). σ(0) = 1/2 with
    u = 1/2 → t = 0 (strict u < σ): ∂loss/∂z = σ(z) − t = +1/2. Per sample: sum over the non-batch dims."""
    z = torch.tensor([[math.log(3.0), math.log(3.0)], [0.0, math.log(3.0)]], dtype=D, device=device, requires_grad=True)
    u = torch.tensor([[0.5, 0.8], [0.5, 0.5]], dtype=D, device=device)
    loss = sampled_loss(z, "bernoulli", "sum", noise=u)
    expected = -math.log(0.75) - math.log(0.25) + math.log(2.0) - math.log(0.75)
    assert loss.item() == pytest.approx(expected, rel=1e-14)
    (grad,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.75], [0.5, -0.25]], dtype=D, device=device))


def test_gaussian_target_is_z_plus_noise_loss_half_square_and_mean_over_samples(device):
    """t = z + ε: loss = ½Σε² per sample; ∂loss/∂z = z − t = −ε (per sample; /N with the default mean)."""
    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], dtype=D, device=device, requires_grad=True)
    eps = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=D, device=device)
    per_sample = [0.5 * (0.25 + 1.0 + 4.0), 0.5 * (2.25 + 0.0625 + 0.25)]
    total = sampled_loss(z, "gaussian", "sum", noise=eps)
    assert total.item() == pytest.approx(sum(per_sample), rel=1e-15)
    (grad,) = torch.autograd.grad(total, z)
    torch.testing.assert_close(grad, -eps, rtol=0, atol=0)
    mean = sampled_loss(z, "gaussian", noise=eps)  # the default reduction is the mean over the batch
    assert mean.item() == pytest.approx(sum(per_sample) / 2, rel=1e-15)
    assert sampled_loss(z, "gaussian", "mean", noise=eps).item() == mean.item()


def test_categorical_inverse_cdf_picks_the_class_by_hand(device):
    """softmax(log 2, 0, 0) = (1/2, 1/4, 1/4), CDF (1/2, 3/4, 1): u = 0.4 → 0, 0.5 → 0 (first class with
    CDF ≥ u), 0.6 → 1, 0.9 → 2. The loss of class t is −log p_t. Output (N, C, L): the class dim is dim 1,
    one uniform per sample and location."""
    row = torch.tensor([math.log(2.0), 0.0, 0.0], dtype=D, device=device)
    z = row.reshape(1, 3, 1).expand(2, 3, 2).clone().requires_grad_(True)  # N=2, C=3, L=2
    u = torch.tensor([[0.4, 0.6], [0.9, 0.5]], dtype=torch.float32, device=device)  # float32 noise for float64 z
    loss = sampled_loss(z, "categorical", "sum", noise=u)
    expected = -(math.log(0.5) + math.log(0.25) + math.log(0.25) + math.log(0.5))
    assert loss.item() == pytest.approx(expected, rel=1e-14)
    (grad,) = torch.autograd.grad(loss, z)  # softmax − one-hot of the sampled class, per location
    p = torch.tensor([0.5, 0.25, 0.25], dtype=D, device=device)
    onehot = torch.zeros(2, 3, 2, dtype=D, device=device)
    for (n, l), t in {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 0}.items():
        onehot[n, t, l] = 1.0
    torch.testing.assert_close(grad, p.reshape(1, 3, 1) - onehot, rtol=1e-14, atol=1e-15)


def test_categorical_u_above_a_rounded_cdf_takes_the_last_class(device):
    """The CDF's last entry can round to just below 1; a uniform above it (still < 1) is the last class."""
    u_max = 1.0 - 2.0 ** -53
    for k in range(200):
        logits = torch.tensor([[0.1 * k, 0.3, -0.7 + 0.01 * k]], dtype=D, device=device)
        if float(torch.softmax(logits, -1).cumsum(-1)[0, -1]) < u_max:
            break
    else:
        pytest.skip("no logits with a CDF rounded below 1 found")
    z = logits.clone().requires_grad_(True)
    loss = sampled_loss(z, "categorical", "sum", noise=torch.tensor([u_max], dtype=D, device=device))
    assert loss.item() == pytest.approx(-float(torch.log_softmax(logits, -1)[0, 2]), rel=1e-14)


def test_categorical_generator_path_is_reproducible_and_samples_valid_classes(device):
    z = torch.zeros(64, 4, 3, dtype=D, device=device)  # uniform over 4 classes: −log p_t = log 4 for every t
    a = sampled_loss(z.clone().requires_grad_(True), "categorical", "sum", torch.Generator(device=device).manual_seed(3))
    assert a.item() == pytest.approx(64 * 3 * math.log(4.0), rel=1e-14)
    grads = []
    for _ in range(2):
        zz = torch.randn(64, 4, dtype=D, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_(True)
        torch.manual_seed(123 + len(grads))  # the global generator must not be what draws
        loss = sampled_loss(zz, "categorical", "sum", torch.Generator(device=device).manual_seed(5))
        grads.append(torch.autograd.grad(loss, zz)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    onehot = torch.softmax(zz.detach(), -1) - grads[0]
    assert torch.equal(onehot.round().sum(1), torch.ones(64, dtype=D, device=device))


@pytest.mark.parametrize("likelihood, shape", [("bernoulli", (5, 2, 3)), ("gaussian", (5, 2, 3)), ("categorical", (5, 3))])
def test_draw_noise_shape_dtype_and_generator(device, likelihood, shape):
    """n rows; per element (Bernoulli, Gaussian) or per location (categorical: the class dim 1 dropped);
    the output's dtype and device; the generator's stream (same seed, same noise, whatever the global seed)."""
    out = torch.zeros(2, 2, 3, dtype=D, device=device)
    draws = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        draws.append(draw_noise(likelihood, out, 5, torch.Generator(device=device).manual_seed(7)))
    assert draws[0].shape == shape and draws[0].dtype == D and draws[0].device == out.device
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def test_errors_name_what_is_wrong(device):
    z = torch.zeros(4, 6, dtype=D, device=device)
    with pytest.raises(ValueError, match=r"^noise has 3 rows for an output of 4 samples$"):
        sampled_loss(z, "gaussian", noise=torch.zeros(3, 6, dtype=D, device=device))
    for call in (lambda: sampled_loss(z, "poisson"), lambda: draw_noise("poisson", z, 4)):
        with pytest.raises(ValueError, match=r"likelihood must be one of \('bernoulli', 'gaussian', 'categorical'\), got 'poisson'"):
            call()
    with pytest.raises(TypeError, match="needs the model to return one tensor, got tuple"):
        sampled_loss((z,), "gaussian")
