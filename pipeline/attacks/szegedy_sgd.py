"""Szegedy et al.'s optimisation attack as the original repository solved it: SGD on a penalty."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.losses import attack_loss


def szegedy_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None = None,
    targeted: bool = False,
    *,
    reg: float,
    lr: float,
    steps: int,
    momentum: float,
) -> torch.Tensor:
    """Minimise loss(f(clip(x + r))) + reg·||r||² over r by SGD (heavy-ball momentum), keeping
    x + r in [0,1] after every step; return clip(x + r) after `steps` steps.

    The loss is cross-entropy towards `target` (targeted) or −log(1 − p_y) (untargeted), summed
    over the batch, so each image is optimised independently of the others. Larger `reg` trades
    success for smaller perturbations.
    """
    if targeted and target is None:
        raise ValueError("targeted szegedy_sgd needs `target` (a class index per image)")
    x = x.detach()
    z = x.clone()  # (B, C, H, W) the adversarial x + r, always in [0,1]
    velocity = torch.zeros_like(x)
    for _ in range(steps):
        z.requires_grad_(True)
        with torch.enable_grad():  # z is in the box, so clip(x + r) = z
            loss = attack_loss(model(z), y, targeted, target).sum() + reg * (z - x).pow(2).sum()
            (grad,) = torch.autograd.grad(loss, z)
        with torch.no_grad():
            velocity.mul_(momentum).add_(grad)
            z = (z - lr * velocity).clamp_(0, 1)
    return z.detach()
