"""The README's 20-line example: K-BFGS(L) on Linear layers, KFAC on Conv2d, in one optimizer."""

import torch
from torch import nn

from optimizers import CurvatureOptimizer, kbfgsl_block, kfac_block

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
opt = CurvatureOptimizer(model, lr=0.1, damping=0.3,
                         blocks={nn.Linear: kbfgsl_block(memory=20), nn.Conv2d: kfac_block()})
print(opt.describe())
x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))
opt.warm_start([(x, y)], nn.functional.cross_entropy)  # authors' one pass over the data: A (and G) at w0
for step in range(50):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)  # K-BFGS(L) calls the closure again at the new point
print(f"loss {loss.item():.3f}, skipped steps {opt.skipped_steps}")
print(opt.blocks["3"].diagnostics()["g_damping"])  # how often each double-damping step fired
