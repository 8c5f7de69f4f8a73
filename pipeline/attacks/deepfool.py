"""DeepFool (Moosavi-Dezfooli et al. 2016), L2: step to the nearest linearised decision boundary
until the prediction changes."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.projection import per_image


def _differences(
    model: nn.Module, z: torch.Tensor, classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (B, C), f_k = Z_k − Z_0 (B, K) for the candidates k = classes[:, 1:] against the
    original class classes[:, 0], and their gradients (B, K, ...): one forward pass and one
    backward pass batched over the K candidates."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(z)
        rows = torch.arange(len(z), device=z.device)[:, None]
        f = logits[rows, classes[:, 1:]] - logits[rows, classes[:, :1]]  # (B, K)
        k = f.shape[1]
        # one-hot vectors, one per candidate, as a batch of backward passes (vmapped by autograd)
        seeds = torch.eye(k, device=z.device, dtype=f.dtype)[:, None, :].expand(k, len(z), k)
        (grads,) = torch.autograd.grad(f, z, grad_outputs=seeds, is_grads_batched=True)
    return logits.detach(), f.detach(), grads.transpose(0, 1)


def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    overshoot: float,
    candidates: int | None,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Untargeted L2 DeepFool on a batch, all images and candidate classes at once.

    Candidates are the `candidates` classes ranked highest on the clean image (all if None), the
    first being the clean prediction. At every step each image not yet misclassified takes the
    linearised step just past its nearest candidate boundary,
    r = (|f_k|/||w_k|| + 1e-4)·w_k/||w_k|| with
    f_k = Z_k − Z_0 and w_k = ∇f_k; the total r is applied with factor (1 + `overshoot`) from the
    clean image and clipped to [0,1]. An image stops as soon as its prediction differs from y.
    `info["iterations"]` gets each image's number of steps.
    """
    if targeted:
        raise ValueError("deepfool is untargeted: it moves to the nearest decision boundary")
    x = x.detach()
    with torch.no_grad():
        logits = model(x)
    k = logits.shape[1] if candidates is None else min(candidates, logits.shape[1])
    classes = logits.argsort(dim=1, descending=True)[:, :k]  # (B, k)
    total = torch.zeros_like(x)
    adv = x.clone()
    iterations = torch.zeros(len(x), dtype=torch.long, device=x.device)
    active = logits.argmax(1) == y
    for _ in range(steps):
        idx = active.nonzero()[:, 0]
        if len(idx) == 0:
            break
        step_logits, f, grads = _differences(model, adv[idx], classes[idx])
        still = step_logits.argmax(1) == y[idx]  # images whose prediction has not changed yet
        active[idx[~still]] = False
        idx, f, grads = idx[still], f[still], grads[still]
        if len(idx) == 0:
            break
        norms = grads.flatten(2).norm(p=2, dim=2)  # (b, k-1)
        nearest = (f.abs() / (norms + 1e-8)).argmin(1)  # (b,)
        pick = torch.arange(len(idx), device=x.device)
        w, f_k, w_norm = grads[pick, nearest], f[pick, nearest], norms[pick, nearest]
        r = (f_k.abs() / (w_norm + 1e-8) + 1e-4) / (w_norm + 1e-8)
        r = per_image(r, w) * w
        total[idx] += r
        adv[idx] = (x[idx] + (1 + overshoot) * total[idx]).clamp(0.0, 1.0)
        iterations[idx] += 1
    if info is not None:
        info["iterations"] = iterations.float()
    return adv
