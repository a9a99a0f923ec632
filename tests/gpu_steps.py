"""A few bf16-autocast SGD steps on a fixed CUDA batch: the losses, for tests that compare two ways of running a net."""

from __future__ import annotations

import torch
from torch import nn


def sgd_losses(net: nn.Module, step_model: nn.Module, x: torch.Tensor, target: torch.Tensor, steps: int = 5):
    """Losses of ``steps`` SGD steps (lr 0.05, momentum 0.9) through ``step_model`` (``net`` or a compiled ``net``)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(step_model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
