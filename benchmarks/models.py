"""The three deep autoencoder benchmarks of Goldfarb, Ren & Bahamou (2020), spec §7.

==========  ==============================================  =========  =========  ===========
name        layer widths                                    layers     params     loss
==========  ==============================================  =========  =========  ===========
``mnist``   784-1000-500-250-30-250-500-1000-784            8 Linear   2,837,314  summed BCE
``faces``   625-2000-1000-500-30-500-1000-2000-625          8 Linear   7,537,655  ½·SSE
``curves``  784-400-200-100-50-25-6-25-50-100-200-400-784   12 Linear  842,340    summed BCE
==========  ==============================================  =========  =========  ===========

Every layer is an ``nn.Linear`` (with bias) with PyTorch's default initialisation. ReLU follows
every hidden layer except the code layer (the narrowest, 30 or 6 units), which is linear; the
output layer is linear too, so the network returns logits (MNIST, CURVES) or raw values (FACES).

Losses are per-sample sums averaged over the batch (dimension 0):

* ``summed_bce_with_logits(z, x)`` = (1/N) Σ_n Σ_i [softplus(z_ni) − x_ni·z_ni]
  (binary cross-entropy of sigmoid(z) against x; Bernoulli likelihood);
* ``half_squared_error(z, x)`` = (1/N) Σ_n ½ Σ_i (z_ni − x_ni)² (Gaussian likelihood, unit variance).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AUTOENCODER_WIDTHS",
    "PAPER_SEED",
    "PARAM_COUNTS",
    "Autoencoder",
    "build_autoencoder",
    "half_squared_error",
    "likelihood_for",
    "loss_for",
    "summed_bce_with_logits",
]

AUTOENCODER_WIDTHS: dict[str, tuple[int, ...]] = {
    "mnist": (784, 1000, 500, 250, 30, 250, 500, 1000, 784),
    "faces": (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625),
    "curves": (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784),
}

#: Parameter counts stated in the spec (weights + biases).
PARAM_COUNTS: dict[str, int] = {"mnist": 2_837_314, "faces": 7_537_655, "curves": 842_340}

#: The seed used by the paper's code.
PAPER_SEED = 9999

_LIKELIHOOD = {"mnist": "bernoulli", "curves": "bernoulli", "faces": "gaussian"}

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _canonical(name: str) -> str:
    key = str(name).lower()
    if key not in AUTOENCODER_WIDTHS:
        raise ValueError(f"unknown autoencoder {name!r}; expected one of {sorted(AUTOENCODER_WIDTHS)}")
    return key


class Autoencoder(nn.Sequential):
    """``nn.Sequential`` of Linear layers with ReLU after every hidden layer but the code layer.

    ``widths`` are the layer widths (input first); ``code_index`` is the index into ``widths`` of
    the code layer (the narrowest). ``linear_layers`` lists the Linear modules in order.
    """

    def __init__(self, widths: Sequence[int], name: str = "custom") -> None:
        widths = tuple(int(w) for w in widths)
        if len(widths) < 3:
            raise ValueError("an autoencoder needs at least input, code and output widths")
        code_index = min(range(1, len(widths) - 1), key=lambda i: widths[i])
        modules: list[nn.Module] = []
        for i in range(1, len(widths)):
            modules.append(nn.Linear(widths[i - 1], widths[i]))
            if i != code_index and i != len(widths) - 1:
                modules.append(nn.ReLU())
        super().__init__(*modules)
        self.widths = widths
        self.code_index = code_index
        self.name = name

    def __getitem__(self, idx):  # a slice is a plain nn.Sequential (e.g. ``model[:k]`` = encoder part)
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]


def build_autoencoder(
    name: str,
    *,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Autoencoder:
    """Build the ``mnist``, ``faces`` or ``curves`` autoencoder.

    The layers are created on the CPU in float32 with PyTorch's default ``nn.Linear``
    initialisation and then moved to ``device``/``dtype``, so a given ``seed`` gives the same
    initial weights on every device (float64 models hold the float32 draws exactly). With
    ``seed`` the global RNG state is left untouched; with ``seed=None`` the global RNG is used
    as PyTorch does. The paper's code uses ``seed=PAPER_SEED`` (9999).
    """
    key = _canonical(name)
    if seed is None:
        model = Autoencoder(AUTOENCODER_WIDTHS[key], key)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Autoencoder(AUTOENCODER_WIDTHS[key], key)
    return model.to(device=device if device is not None else "cpu", dtype=dtype)


def _batch_size(x: torch.Tensor) -> int:
    return x.shape[0] if x.dim() > 1 else 1


def summed_bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (dim 0) of the per-sample sum of BCE-with-logits over all other dims."""
    if logits.shape != target.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} vs target {tuple(target.shape)}")
    total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    return total / _batch_size(logits)


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch (dim 0) of ½·Σ (out − target)² over all other dims."""
    if out.shape != target.shape:
        raise ValueError(f"shape mismatch: output {tuple(out.shape)} vs target {tuple(target.shape)}")
    return 0.5 * (out - target).pow(2).sum() / _batch_size(out)


def loss_for(name: str) -> Loss:
    """The training loss of a benchmark: summed BCE for mnist/curves, ½·SSE for faces."""
    key = _canonical(name)
    return half_squared_error if _LIKELIHOOD[key] == "gaussian" else summed_bce_with_logits


def likelihood_for(name: str) -> str:
    """``"bernoulli"`` for mnist/curves (outputs are logits), ``"gaussian"`` for faces."""
    return _LIKELIHOOD[_canonical(name)]
