r"""A user layer with its own adapter: ``Scale``, :math:`y = x \odot w + b` (per-feature ``w``, ``b``).

Its rows are one per (sample, feature) pair, like the locations of a convolution:
:math:`\bar a_{ij} = [x_{ij}, 1]` and :math:`g_{ij} = (\partial\ell_i/\partial y_{ij})\,e_j`, so that
:math:`\sum_{ij} g_{ij}\bar a_{ij}^\top = [\nabla w \mid \nabla b]` (``d × 2``). KFAC's factors are then a
2×2 :math:`A = \frac1N\sum_{ij}\bar a_{ij}\bar a_{ij}^\top` and a diagonal
:math:`G = \frac1{Nd}\sum_{ij}(\partial\ell_i/\partial y_{ij})^2 e_je_j^\top`.
"""

import torch
from torch import nn

from curvature import LayerAdapter, register_adapter


class Scale(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class ScaleAdapter(LayerAdapter):  # [w | b] as a d × 2 matrix: LayerAdapter's weight/bias defaults
    sums_over_locations = True  # the features of one sample are its locations (KFC convention)

    a_dim = property(lambda self: 1 + int(self.has_bias))
    g_dim = property(lambda self: self.module.weight.numel())

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:  # [N·d, 1], sample-major
        return x.reshape(-1, 1)

    def output_rows(self, h: torch.Tensor) -> torch.Tensor:  # [N·d, d]: row (i, j) is h_ij e_j
        return torch.diag_embed(h.reshape(-1, h.shape[-1])).reshape(-1, h.shape[-1])


register_adapter(Scale, ScaleAdapter, replace=True)  # replace: re-running the file is harmless
