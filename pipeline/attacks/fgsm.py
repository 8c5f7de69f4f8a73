"""Fast gradient sign method (Goodfellow et al. 2015)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | Sequence[float],
    targeted: bool = False,
    target: torch.Tensor | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """One signed-gradient step of size `eps`, clipped to [0,1].

    Untargeted: x + eps·sign(∇ CE(f(x), y)). Targeted: x − eps·sign(∇ CE(f(x), target)).
    With a sequence of eps the gradient is computed once and a list of adversarials,
    one per eps, is returned. The loss is summed over the batch, so each image's step
    does not depend on the batch it comes in. `model` is used as given (put it in eval mode).
    """
    if targeted and target is None:
        raise ValueError("targeted FGSM needs `target` (a class index per image)")
    labels = target if targeted else y
    assert labels is not None  # a targeted call without `target` was rejected above
    x = x.detach().requires_grad_(True)  # (B, C, H, W)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    step = grad.sign_().neg_() if targeted else grad.sign_()
    x = x.detach()
    if isinstance(eps, Sequence):
        return [(x + e * step).clamp_(0.0, 1.0) for e in eps]
    return (x + eps * step).clamp_(0.0, 1.0)
