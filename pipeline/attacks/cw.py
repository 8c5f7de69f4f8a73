"""Carlini & Wagner's L2 attack (2017): the smallest perturbation found by Adam on a tanh
change of variables, with a per-image binary search over the constant c."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.projection import per_image

BIG = 1e10  # "no upper bound on c yet"


def _margin(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """(B,) Z_label − max_{j≠label} Z_j: positive when classified as `label`."""
    own = logits.gather(1, label[:, None])[:, 0]
    others = logits.scatter(1, label[:, None], float("-inf")).amax(1)
    return own - others


def _adam(
    w: torch.Tensor,
    grad: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.Tensor:
    """One Adam step on w (the moments are updated in place), as torch.optim.Adam computes it."""
    mean.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    var.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denom = (var / (1 - betas[1] ** step)).sqrt_().add_(eps)
    return w.addcdiv(mean, denom, value=-lr / (1 - betas[0] ** step))


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    *,
    confidence: float,
    c_init: float,
    binary_steps: int,
    steps: int,
    lr: float,
    abort_early: bool,
    info: dict | None = None,
) -> torch.Tensor:
    """Minimise ||x' − x||² + c·max(m, −κ) with x' = (tanh(w) + 1)/2, so x' is always in [0,1];
    m = max_{j≠t} Z_j − Z_t towards target t (targeted) or Z_y − max_{j≠y} Z_j (untargeted),
    κ = `confidence`. Adam (`lr`) runs `steps` iterations per value of c from w = atanh(2x − 1);
    with `abort_early`, an image stops once its objective fell less than 0.01 % over a tenth of
    the steps. Per image, c starts at `c_init`, is bisected after a success and multiplied by 10
    after a failure while no success bounds it, for `binary_steps` values.

    Returns, per image, the smallest-L2 x' whose logits clear the margin κ; x itself where none
    did. `info["c_final"]` gets the smallest successful c per image (NaN where none).
    """
    if targeted and target is None:
        raise ValueError("targeted cw_l2 needs `target` (a class index per image)")
    x = x.detach()
    label = target if targeted else y
    assert label is not None  # a targeted call without `target` was rejected above
    sign = -1.0 if targeted else 1.0  # m = sign · margin(label)
    n = len(x)
    w0 = torch.atanh((2 * x - 1) * (1 - 1e-6))
    c = torch.full((n,), c_init, device=x.device)
    lower, upper = torch.zeros_like(c), torch.full_like(c, BIG)
    best_l2 = torch.full_like(c, float("inf"))
    best = x.clone()
    check_every = max(steps // 10, 1)
    for _ in range(binary_steps):
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        # the images still optimised, their variables and Adam's moments; an image whose objective
        # stalls (abort_early) is dropped, which changes nothing for the others
        idx = torch.arange(n, device=x.device)
        w, mean, var = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        previous = torch.full_like(c, float("inf"))
        x_a, label_a, c_a = x, label, c  # x, label and c of the images in idx
        for step in range(1, steps + 1):
            w.requires_grad_(True)
            with torch.enable_grad():
                adv = (torch.tanh(w) + 1) / 2
                l2sq = (adv - x_a).flatten(1).pow(2).sum(1)
                m = sign * _margin(model(adv), label_a)
                objective = l2sq + c_a * torch.clamp(m, min=-confidence)
                (grad,) = torch.autograd.grad(objective.sum(), w)
            with torch.no_grad():
                # success with the margin κ: m at or below −κ
                ok = m <= -confidence if confidence > 0 else m < 0
                improved = ok & (l2sq < best_l2[idx])
                best_l2[idx] = torch.where(improved, l2sq, best_l2[idx])
                best[idx] = torch.where(per_image(improved, x), adv.detach(), best[idx])
                found[idx] |= ok
                w = _adam(w.detach(), grad, mean, var, step, lr)
                if abort_early and step % check_every == 0:
                    keep = objective <= previous[idx] * 0.9999
                    previous[idx] = objective
                    if not keep.all():
                        idx, w, mean, var = idx[keep], w[keep], mean[keep], var[keep]
                        x_a, label_a, c_a = x_a[keep], label_a[keep], c_a[keep]
                        if len(idx) == 0:
                            break
        with torch.no_grad():
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            bounded = upper < BIG / 10
            c = torch.where(bounded, (lower + upper) / 2, c * 10)
    if info is not None:
        info["c_final"] = torch.where(upper < BIG / 10, upper, torch.full_like(upper, float("nan")))
    return best
