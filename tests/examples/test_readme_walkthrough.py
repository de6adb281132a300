"""The README's "Writing your own curvature" walkthrough runs as printed; its factor sees the diagonal
of the A statistic (oracle: the layer input) and the composed optimizer trains."""

from __future__ import annotations

from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _walkthrough() -> str:
    text = README.read_text()
    section = text[text.index("## Writing your own curvature"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_walkthrough_runs_and_its_factor_sees_the_statistic_diagonal(capsys):
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(_walkthrough(), "README walkthrough", "exec"), ns)
    assert "diag-a-kfac[A: DiagonalFactor, G: EMACovarianceFactor]" in capsys.readouterr().out
    model, opt = ns["model"], ns["opt"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    a_bar = torch.cat([x, torch.ones(64, 1)], dim=1)
    torch.testing.assert_close(opt.blocks["0"].a_factor.d, 0.1 * (a_bar ** 2).mean(0))  # EMA from zero
    losses = [float(opt.step(closure).detach()) for _ in range(100)]
    assert losses[-1] < 0.5 * first
