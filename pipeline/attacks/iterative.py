"""Iterative gradient attacks under an eps budget: BIM (Kurakin et al. 2017), PGD (Madry et al.
2018; Linf and L2, random start, restarts), MI-FGSM (Dong et al. 2018) and TRADES' inner
maximisation of the KL divergence from the clean prediction (Zhang et al. 2019).

Every step is projected back onto the threat model — the eps ball around x intersected with
[0,1] — so every iterate, not only the last, is a valid adversarial. Losses are summed over the
batch, and random starts are drawn per image from `seeds`, so an image's adversarial does not
depend on the other images of its batch. A list of eps runs the attack once per value; for
`bim` and `mifgsm`, `eps` (and `alpha`) may also be a tensor of one value per image shaped to
broadcast against x, (B, 1, 1, 1), e.g. to bisect each image's radius.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.losses import succeeded
from pipeline.attacks.projection import check_norm, l2_normalise, per_eps, per_image, project, random_point

# alpha None: the step size as a multiple of eps/steps
PGD_STEP = 2.5  # Madry et al.
BIM_STEP = 1.0  # bim and mifgsm: the steps together just reach the ball's edge


def default_alpha(factor: float, eps, steps: int):
    """The step size `factor`·eps/steps (eps a float or one radius per image)."""
    return factor * eps / max(steps, 1)


def _loss(
    model: nn.Module, z: torch.Tensor, y: torch.Tensor, targeted: bool, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-image loss the attack increases, logits): CE(y) untargeted, −CE(target) targeted."""
    logits = model(z)
    if targeted:
        assert target is not None  # `_check` rejects a targeted attack without `target`
        return -F.cross_entropy(logits, target, reduction="none"), logits
    return F.cross_entropy(logits, y, reduction="none"), logits


Gradient = Callable[[torch.Tensor], torch.Tensor]  # z → ∇ of the summed loss the attack increases


def _loss_gradient(model, y, targeted, target) -> Gradient:
    """z ↦ ∇_z of the summed CE(y) (untargeted) or −CE(target) (targeted)."""

    def gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, _ = _loss(model, z, y, targeted, target)
            (grad,) = torch.autograd.grad(loss.sum(), z)
        return grad

    return gradient


def _ascend(gradient: Gradient, x, z, eps, norm, alpha, steps, decay=None) -> torch.Tensor:
    """`steps` projected steps from z: sign of the gradient (Linf) or the L2-normalised gradient
    (L2); with `decay`, MI-FGSM's momentum over L1-normalised gradients."""
    momentum = torch.zeros_like(x) if decay is not None else None
    for _ in range(steps):
        grad = gradient(z)
        if momentum is not None:
            scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True)
            momentum = grad / scale.clamp_min(1e-30) + decay * momentum
            grad = momentum
        step = grad.sign() if norm == "linf" else l2_normalise(grad)
        z = project(x, z + alpha * step, eps, norm)
    return z


def _check(targeted: bool, target, steps: int, restarts: int) -> None:
    if targeted and target is None:
        raise ValueError("a targeted attack needs `target` (a class index per image)")
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps={steps} must be ≥ 0 and restarts={restarts} ≥ 1")


@per_eps
def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    alpha: float | None,
    steps: int,
    random_start: bool,
    restarts: int,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient descent in the `norm` ball of radius `eps` ("linf" or "l2").

    Each restart starts from a random point of the ball (`random_start`; else from x) and takes
    `steps` steps of size `alpha` (None: PGD_STEP·eps/steps, Madry et al.): the gradient's sign for
    Linf, the gradient scaled to unit L2 norm for L2. With several restarts each image keeps its
    own worst case: a successful restart over a failed one, then the higher loss — so adding
    restarts never makes an image's result worse. `seeds` (one int per image) makes the random
    starts per image and reproducible; without it the global torch generator is used.
    """
    check_norm(norm)
    _check(targeted, target, steps, restarts)
    alpha = default_alpha(PGD_STEP, eps, steps) if alpha is None else alpha
    x = x.detach()
    gradient = _loss_gradient(model, y, targeted, target)
    best: torch.Tensor | None = None
    best_success: torch.Tensor | None = None
    best_loss: torch.Tensor | None = None
    for restart in range(restarts):
        start = random_point(x, eps, norm, seeds, restart) if random_start else x
        z = _ascend(gradient, x, start, eps, norm, alpha, steps)
        if restarts == 1:
            return z
        with torch.no_grad():
            loss, logits = _loss(model, z, y, targeted, target)
        success = succeeded(logits, y, targeted, target)
        if best is None:
            best, best_success, best_loss = z, success, loss
            continue
        assert best_success is not None and best_loss is not None  # set with `best`
        # an image's worst case: a success over a failure, then the higher loss
        better = (success > best_success) | ((success == best_success) & (loss > best_loss))
        best = torch.where(per_image(better, z), z, best)
        best_success, best_loss = best_success | success, torch.where(better, loss, best_loss)
    assert best is not None  # restarts ≥ 2 here (`_check` rejects < 1; 1 returned in the loop)
    return best


@per_eps
def bim(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    alpha: float | torch.Tensor | None,
    steps: int,
    targeted: bool = False,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Basic iterative method (iterative FGSM): from x, `steps` signed-gradient steps of size
    `alpha` (None: BIM_STEP·eps/steps), each projected onto the Linf ball of radius eps and [0,1]
    — PGD without a random start."""
    _check(targeted, target, steps, 1)
    alpha = default_alpha(BIM_STEP, eps, steps) if alpha is None else alpha
    gradient = _loss_gradient(model, y, targeted, target)
    return _ascend(gradient, x.detach(), x.detach(), eps, "linf", alpha, steps)


@per_eps
def mifgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    alpha: float | torch.Tensor | None,
    steps: int,
    decay: float,
    targeted: bool = False,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Momentum iterative FGSM: g ← ∇/mean|∇| + decay·g, then a signed step of size `alpha`
    (None: BIM_STEP·eps/steps) along g, projected onto the Linf ball of radius eps and [0,1]."""
    _check(targeted, target, steps, 1)
    alpha = default_alpha(BIM_STEP, eps, steps) if alpha is None else alpha
    gradient = _loss_gradient(model, y, targeted, target)
    return _ascend(gradient, x.detach(), x.detach(), eps, "linf", alpha, steps, decay=decay)


@per_eps
def pgd_kl(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    alpha: float | None,
    steps: int,
    init_std: float,
) -> torch.Tensor:
    """TRADES' inner maximisation (Zhang et al. 2019): from x + init_std·N(0, 1), `steps` signed
    steps of size `alpha` (None: PGD_STEP·eps/steps) up KL(f(x) ‖ f(z)), the divergence of z's
    prediction from x's, each projected onto the Linf ball of radius eps and [0,1]. Labels are not
    used (`y` keeps the attacks' common signature); the start is drawn from the global generator."""
    _check(False, None, steps, 1)
    alpha = default_alpha(PGD_STEP, eps, steps) if alpha is None else alpha
    x = x.detach()
    with torch.no_grad():
        clean = F.log_softmax(model(x), dim=1)

    def gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            kl = F.kl_div(F.log_softmax(model(z), dim=1), clean, reduction="sum", log_target=True)
            (grad,) = torch.autograd.grad(kl, z)
        return grad

    start = project(x, x + init_std * torch.randn_like(x), eps, "linf")
    return _ascend(gradient, x, start, eps, "linf", alpha, steps)
