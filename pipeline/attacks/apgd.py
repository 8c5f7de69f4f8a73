"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): APGD with the cross-entropy or the DLR loss, and APGD-T, the
targeted-DLR attack over the runner-up classes of AutoAttack — Linf and L2.

APGD is PGD with momentum (0.75) and a step size η that adapts per image: it starts at 2·eps and,
at checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06) (× steps, with
the official code's integer rounding), is halved for an image whose loss rose in at most a fraction
`rho` of the steps since the last checkpoint, or whose η and best loss both stayed the same over
the last interval; a halving also restarts the image from its best point so far. The rule is the
official code's (increases ≤ rho·interval), except that the first step's increase is judged
against the start's loss, as in the paper (the official code compares it with 0: an unfilled entry
of its loss buffer).

Everything is per image: the η, the counters, the best points, the random starts (drawn from
`seeds`) — and the losses are summed over the batch for the gradient — so an image's result never
depends on the other images of its batch. An image counts as broken as soon as one iterate (the
random start included) is misclassified (untargeted: argmax ≠ y; targeted: argmax == target); it
keeps that first successful iterate and leaves the active batch at once (no more forward or
backward passes for it). An image never broken keeps its highest-loss point over all runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.losses import succeeded
from pipeline.attacks.projection import check_norm, l2_normalise, per_eps, per_image, project, seeded_noise

LOSSES = ("ce", "dlr")
MOMENTUM = 0.75  # the weight of the new step; 1 − MOMENTUM goes to the previous displacement
STEP_INIT = 2.0  # η starts at STEP_INIT·eps
P1, P_DECAY, P_MIN = 0.22, 0.03, 0.06  # the checkpoints' schedule, as fractions of `steps`
# Loss of the logits (B, C) given the indices of the images they belong to in the run's batch.
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Success = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the same arguments → (B,) bool


def _sorted_logit(logits: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank`-th highest logit (0: the largest), the smallest one when there are fewer
    classes (so DLR is defined from two classes on)."""
    return logits.topk(min(rank + 1, logits.shape[1]), dim=1).values[:, -1]


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) DLR: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e−12), π the logits sorted downwards."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return -(true - other) / (_sorted_logit(logits, 0) - _sorted_logit(logits, 2) + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) targeted DLR: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e−12)."""
    true = logits.gather(1, y[:, None])[:, 0]
    aim = logits.gather(1, target[:, None])[:, 0]
    spread = _sorted_logit(logits, 0) - 0.5 * (_sorted_logit(logits, 2) + _sorted_logit(logits, 3))
    return -(true - aim) / (spread + 1e-12)


def checkpoints(steps: int) -> list[tuple[int, int]]:
    """(iteration, interval length) of every checkpoint, as the official code rounds them: a first
    interval of int(0.22·steps), each next one int(0.03·steps) shorter, never below int(0.06·steps)
    (each at least 1). The check after iteration i (0-based) covers the last `length` steps."""
    length, shortest, decay = (max(int(f * steps), 1) for f in (P1, P_MIN, P_DECAY))
    marks, i = [], length - 1
    while i < steps:
        marks.append((i, length))
        length = max(length - decay, shortest)
        i += length
    return marks


def _start(x: torch.Tensor, eps: float, norm: str, seeds: torch.Tensor | None, run: int) -> torch.Tensor:
    """The official random start: Linf x + eps·t/max|t| with t uniform in [−1,1]^d; L2
    x + eps·t/||t|| with t standard normal; then into [0,1]. With `seeds` each image's draw comes
    from its own generator, seeded from (seed, run); without, from the global generator."""
    t = seeded_noise(norm, len(x), x[0].numel(), seeds, (run,), x.device, x.dtype).view_as(x)
    if norm == "linf":
        t = 2 * t - 1
        scale = t.flatten(1).abs().amax(1).clamp_min(1e-12)
    else:
        scale = t.flatten(1).norm(p=2, dim=1) + 1e-12
    # project: x + δ may exceed the ball by an ulp
    return project(x, x + eps * t / per_image(scale, t), eps, norm)


def _gradient(
    model: nn.Module, z: torch.Tensor, loss_fn: Loss, rows: torch.Tensor, eot_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∇ of the summed loss, per-image loss, logits) at z, the gradient and the loss averaged over
    `eot_iter` passes (a randomised model); the logits are the last pass's."""
    grad = torch.zeros_like(z)
    loss_sum = torch.zeros(len(z), device=z.device, dtype=z.dtype)
    logits = z.new_empty(0)
    for _ in range(eot_iter):
        leaf = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(leaf)
            loss = loss_fn(logits, rows)
            (g,) = torch.autograd.grad(loss.sum(), leaf)
        grad += g
        loss_sum += loss.detach()
    # a non-finite gradient (DLR's denominator at a tie) must not put NaNs into the iterate
    return (grad / eot_iter).nan_to_num_(0.0), loss_sum / eot_iter, logits.detach()


def _single_run(
    model: nn.Module,
    x: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    norm: str,
    loss_fn: Loss,
    success_fn: Success,
    steps: int,
    rho: float,
    eot_iter: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from `start` on every image of x: (point, success, loss) per image, the point
    the first successful iterate, else the highest-loss one. `loss_fn(logits, rows)` and
    `success_fn(logits, rows)` get the images' indices in x, since broken images leave the batch."""
    n = len(x)
    out = start.clone()
    out_success = torch.zeros(n, dtype=torch.bool, device=x.device)
    out_loss = torch.full((n,), float("-inf"), device=x.device, dtype=x.dtype)

    rows = torch.arange(n, device=x.device)  # the active images' indices in x
    xa, z = x, start
    grad, loss, logits = _gradient(model, z, loss_fn, rows, eot_iter)
    best_loss, x_best, grad_best = loss, z, grad
    z_old = z
    eta = torch.full((n,), STEP_INIT * eps, device=x.device, dtype=x.dtype)
    prev_loss = loss  # the paper: the first step's increase is judged against the start's loss
    increases = torch.zeros(n, device=x.device, dtype=torch.long)
    best_at_check, reduced_at_check = best_loss, torch.ones(n, dtype=torch.bool, device=x.device)
    marks = dict(checkpoints(steps))

    for i in range(-1, steps):  # -1: the random start, which may already succeed
        if i >= 0:
            a = MOMENTUM if i > 0 else 1.0
            step = grad.sign() if norm == "linf" else l2_normalise(grad)
            z1 = project(xa, z + per_image(eta, z) * step, eps, norm)
            z, z_old = project(xa, z + a * (z1 - z) + (1 - a) * (z - z_old), eps, norm), z
            grad, loss, logits = _gradient(model, z, loss_fn, rows, eot_iter)

        done = success_fn(logits, rows)
        if bool(done.any()):  # the one host sync per step: record the broken images, drop them
            hit = rows[done]
            out[hit], out_success[hit], out_loss[hit] = z[done], True, loss[done]
            keep = ~done
            if not bool(keep.any()):
                return out, out_success, out_loss
            rows, xa, z, z_old, grad, eta = rows[keep], xa[keep], z[keep], z_old[keep], grad[keep], eta[keep]
            loss, prev_loss, increases = loss[keep], prev_loss[keep], increases[keep]
            best_loss, x_best, grad_best = best_loss[keep], x_best[keep], grad_best[keep]
            best_at_check, reduced_at_check = best_at_check[keep], reduced_at_check[keep]
        if i < 0:
            continue

        better = loss > best_loss
        best_loss = torch.where(better, loss, best_loss)
        x_best = torch.where(per_image(better, z), z, x_best)
        grad_best = torch.where(per_image(better, z), grad, grad_best)
        increases += loss > prev_loss
        prev_loss = loss
        if i in marks:  # halve η (and go back to the best point) where progress stalled
            stalled = increases <= marks[i] * rho
            no_gain = ~reduced_at_check & (best_at_check >= best_loss)
            reduce = stalled | no_gain
            reduced_at_check, best_at_check = reduce, best_loss
            eta = torch.where(reduce, eta / 2, eta)
            z = torch.where(per_image(reduce, z), x_best, z)
            grad = torch.where(per_image(reduce, z), grad_best, grad)
            increases = torch.zeros_like(increases)

    out[rows], out_loss[rows] = x_best, best_loss
    return out, out_success, out_loss


class _Result:
    """Each image's worst case so far: a success over a failure, then the higher loss."""

    def __init__(self, x: torch.Tensor):
        self.adv = x.clone()
        self.success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.loss = torch.full((len(x),), float("-inf"), device=x.device, dtype=x.dtype)

    def todo(self, attacked: torch.Tensor) -> torch.Tensor:
        """Indices of the attacked images not broken yet."""
        return (attacked & ~self.success).nonzero().squeeze(1)

    def update(self, idx: torch.Tensor, adv: torch.Tensor, success: torch.Tensor, loss: torch.Tensor):
        # only unbroken images run, so a success always wins; otherwise the higher loss does
        better = success | (loss > self.loss[idx])
        self.adv[idx] = torch.where(per_image(better, adv), adv, self.adv[idx])
        self.loss[idx] = torch.where(better, loss, self.loss[idx])
        self.success[idx] |= success


def _check(norm: str, steps: int, restarts: int, rho: float, eot_iter: int) -> None:
    check_norm(norm)
    if steps < 0 or restarts < 1 or eot_iter < 1 or not 0 <= rho <= 1:
        raise ValueError(
            f"steps={steps} must be ≥ 0, restarts={restarts} and eot_iter={eot_iter} ≥ 1, rho={rho} in [0, 1]"
        )


@per_eps
def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    loss: str,
    steps: int,
    restarts: int,
    rho: float,
    eot_iter: int,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """APGD in the `norm` ball of radius `eps` ("linf" or "l2") on the loss `loss`: "ce" (the
    cross-entropy of y; targeted: −CE of `target`) or "dlr" (DLR; targeted: the targeted DLR).

    Each of `restarts` runs of `steps` steps starts from the official random point of the ball and
    attacks only the images not broken yet; each image keeps its worst case (a success, else its
    highest loss), so restarts never make an image's result worse. `eot_iter` averages the gradient
    over that many passes (randomised models). `seeds` (one int per image) makes the random starts
    per image and reproducible; without it the global torch generator is used. Images already
    successful on x (untargeted: misclassified; targeted: classified as `target`) are returned as x.
    """
    _check(norm, steps, restarts, rho, eot_iter)
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; use one of {', '.join(LOSSES)}")
    if targeted and target is None:
        raise ValueError("a targeted attack needs `target` (a class index per image)")
    x = x.detach()
    aim = target if targeted else None

    def objective(y_run: torch.Tensor, aim_run: torch.Tensor | None) -> tuple[Loss, Success]:
        """The loss and the success test of a run on the images with labels y_run (targets aim_run)."""

        def loss_fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            if aim_run is None:
                if loss == "ce":
                    return F.cross_entropy(logits, y_run[rows], reduction="none")
                return dlr_loss(logits, y_run[rows])
            if loss == "ce":
                return -F.cross_entropy(logits, aim_run[rows], reduction="none")
            return dlr_loss_targeted(logits, y_run[rows], aim_run[rows])

        def success_fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return succeeded(logits, y_run[rows], targeted, None if aim_run is None else aim_run[rows])

        return loss_fn, success_fn

    with torch.no_grad():
        attacked = ~succeeded(model(x), y, targeted, aim)
    result = _Result(x)
    for restart in range(restarts):
        idx = result.todo(attacked)
        if len(idx) == 0:
            break
        xs = x[idx]
        loss_fn, success_fn = objective(y[idx], None if aim is None else aim[idx])
        start = _start(xs, eps, norm, None if seeds is None else seeds[idx], restart)
        result.update(
            idx, *_single_run(model, xs, start, eps, norm, loss_fn, success_fn, steps, rho, eot_iter)
        )
    return result.adv


@per_eps
def apgd_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    steps: int,
    restarts: int,
    rho: float,
    eot_iter: int,
    n_targets: int,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """APGD-T (AutoAttack's): for k = 0 .. n_targets − 1 (at most classes − 1), targeted-DLR APGD
    towards the (k+2)-th highest clean logit, `restarts` runs per target, each run only on the images
    no run has broken yet. Untargeted overall: an image is broken when misclassified (argmax ≠ y),
    whichever class it lands on; `targeted=True` is refused. Each image keeps its worst case (a
    success, else its highest targeted-DLR loss over all runs). Images misclassified on x are
    returned as x. `seeds`: as in `apgd`, each (target, restart) with its own draw."""
    if targeted:
        raise ValueError("apgd_t is untargeted (it picks its own targets); use apgd for a targeted attack")
    _check(norm, steps, restarts, rho, eot_iter)
    if n_targets < 1:
        raise ValueError(f"n_targets={n_targets} must be ≥ 1")
    x = x.detach()

    def objective(y_run: torch.Tensor, aim_run: torch.Tensor) -> tuple[Loss, Success]:
        """Targeted DLR towards aim_run; success is any misclassification."""

        def loss_fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return dlr_loss_targeted(logits, y_run[rows], aim_run[rows])

        def success_fn(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return logits.argmax(1) != y_run[rows]

        return loss_fn, success_fn

    with torch.no_grad():
        clean = model(x)
    attacked = clean.argmax(1) == y
    ranked = clean.argsort(dim=1, descending=True)
    result = _Result(x)
    for k in range(min(n_targets, clean.shape[1] - 1)):
        for restart in range(restarts):
            idx = result.todo(attacked)
            if len(idx) == 0:
                return result.adv
            xs = x[idx]
            loss_fn, success_fn = objective(y[idx], ranked[idx, k + 1])
            start = _start(xs, eps, norm, None if seeds is None else seeds[idx], k * restarts + restart)
            run = _single_run(model, xs, start, eps, norm, loss_fn, success_fn, steps, rho, eot_iter)
            result.update(idx, *run)
    return result.adv
