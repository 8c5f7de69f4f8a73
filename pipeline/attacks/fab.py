"""FAB, the Fast Adaptive Boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"), in its targeted form FAB-T as AutoAttack's standard
ensemble runs it: Linf and L2, under an eps budget.

For a target class t, every step linearises the logit difference f = Z_t − Z_y at the current point
z, so that the decision boundary becomes the hyperplane {u : f(z) + ∇f(z)·(u − z) = 0}, and projects
both z and the clean image x onto that hyperplane intersected with the [0,1] box — the exact
smallest step in the attack's norm (`hyperplane_step`; where the box keeps the hyperplane out of
reach, the step to the box corner that gets closest). The next point mixes the two projections,
biased towards x:

    z ← clip((z + η·d_z)·(1 − α) + (x + η·d_x)·α),   α = min(‖d_z‖ / (‖d_z‖ + ‖d_x‖), alpha_max),

η = `eta` overshooting the boundary. A successful point (untargeted: argmax ≠ y; targeted:
argmax == target) is kept if it is the smallest adversarial found so far, and z steps back towards
x: z ← x + `beta`·(z − x). The first run starts at x (its first step is the plain projection of x,
whatever α); each later restart from a random point at radius min(smallest norm found, eps)/2
around x, as in the original (Linf: a uniform draw in the cube rescaled to the sphere; L2: a normal
draw on the sphere), drawn per image from `seeds`.

AutoAttack's FAB-T (untargeted overall): for k = 0 .. n_targets − 1 (at most classes − 1) the target
is the (k+2)-th highest clean logit, `restarts` runs per target, each run only on the images no run
has broken yet. An image counts as broken only by an adversarial within eps: it then leaves the
active batch at once (no more passes for it), so the adversarial returned is the first one within
eps, not the smallest FAB would reach by running all its steps. Everything is per image — the
gradient of the batch-summed difference gives each image its own — so an image's result never
depends on the other images of its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.attacks.projection import check_norm, per_eps, per_image, seeded_noise

START_RADIUS = 0.5  # restarts start at this fraction of min(smallest norm found, eps) from x
_SALT = 0xFAB  # keeps FAB's random starts apart from the other attacks' draws from the same seeds


def _norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """(n,) the norm of each row of `delta` (any shape with the images first)."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def hyperplane_step(t: torch.Tensor, w: torch.Tensor, v: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest step d (Linf or L2 norm) from each row of t (n, D) onto its hyperplane
    {u : w·(u − t) + v = 0} — w (n, D), v (n,) the linear function's value at t — such that t + d
    stays in [0,1]^D (AutoAttack's projection_linf / projection_l2). Where the box keeps the
    hyperplane out of reach: the step to the box's corner nearest it (every coordinate all the way
    towards it).

    Reaching the hyperplane means lowering sign(v)·w·u by |v|: every coordinate moves the way that
    does (to 0 where sign(v)·w_i > 0, else to 1) by m_i ≤ room_i, its distance to that face of the
    box. Linf: m_i = min(λ, room_i); L2 (the KKT point): m_i = min(μ·|w_i|, room_i). Either way the
    decrease Σ|w_i|·m_i is piecewise linear and nondecreasing in λ (μ), with a kink where a
    coordinate saturates; sorting the kinks gives the piece that reaches |v| and λ (μ) on it in
    closed form."""
    size = w.shape[1]
    side = torch.sign(v)[:, None]  # 0 where t lies on the hyperplane: no step
    magnitude = w.abs()
    moves = magnitude > 0
    room = torch.where(side * w > 0, t, 1.0 - t)
    room = torch.where(moves, room, torch.zeros_like(room))
    if norm == "linf":
        kink, slope = room, magnitude  # coordinate i saturates at λ = room_i
    else:  # coordinate i saturates at μ = room_i / |w_i|
        kink = torch.where(moves, room / magnitude.clamp_min(1e-30), torch.zeros_like(room)).clamp_max(1e12)
        slope = magnitude * magnitude
    kink, order = kink.sort(dim=1)
    full = (magnitude * room).gather(1, order)  # decrease of a saturated coordinate
    saturated = full.cumsum(1) - full  # kinks below the k-th: saturated (exclusive sum)
    free = slope.gather(1, order).flip(1).cumsum(1).flip(1)  # the k-th kink and above: free
    reach = saturated + kink * free  # decrease at the k-th kink, nondecreasing in k
    need = v.abs()[:, None]
    piece = (reach < need).sum(1, keepdim=True)  # the kink that first reaches |v|; size: none
    at = piece.clamp_max(size - 1)
    scale = ((need - saturated.gather(1, at)) / free.gather(1, at).clamp_min(1e-30)).clamp_min(0.0)
    move = torch.minimum(scale if norm == "linf" else scale * magnitude, room)
    move = torch.where(piece < size, move, room)  # out of reach: the whole way to the corner
    return -side * torch.sign(w) * move


def _difference(
    model: nn.Module, z: torch.Tensor, y: torch.Tensor, aim: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f = Z_aim − Z_y (n,) at z and its gradient (n, ...): one forward and one backward pass of
    the batch-summed difference (each image's gradient is its own)."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(z)
        rows = torch.arange(len(z), device=z.device)
        f = logits[rows, aim] - logits[rows, y]
        (grad,) = torch.autograd.grad(f.sum(), z)
    return f.detach(), grad


def _start(
    x: torch.Tensor, radius: torch.Tensor, norm: str, seeds: torch.Tensor | None, draw: int
) -> torch.Tensor:
    """x plus a random step of norm `radius` (n,), clipped to [0,1] (the original's restarts):
    Linf a uniform draw in [−1,1]^D scaled to the sphere, L2 a normal draw scaled to it. With
    `seeds` an image's draw depends only on its seed and `draw`."""
    noise = seeded_noise(norm, len(x), x[0].numel(), seeds, (draw, _SALT), x.device).to(x.dtype)
    if norm == "linf":
        noise = 2 * noise - 1
    direction = noise / per_image(_norms(noise, norm).clamp_min(1e-12), noise)
    return (x + (radius[:, None] * direction).view_as(x)).clamp(0.0, 1.0)


def _run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    aim: torch.Tensor,
    start: torch.Tensor,
    eps: float,
    norm: str,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
    targeted: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB run towards `aim` from `start`: (smallest adversarial found per image, its norm —
    inf where none). An image stops once it has one within eps.
    """
    best, best_norm = x.clone(), torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
    live = torch.arange(len(x), device=x.device)  # the images still running, as rows of x
    z, xs, ys, aims = start.clone(), x, y, aim
    for _ in range(steps):
        if len(live) == 0:
            break
        f, grad = _difference(model, z, ys, aims)
        w = grad.flatten(1)
        # the linearised boundary's value at z is f, at x it is f + w·(x − z)
        offsets = torch.cat((f, f + (w * (xs - z).flatten(1)).sum(1)))
        d = hyperplane_step(torch.cat((z.flatten(1), xs.flatten(1))), torch.cat((w, w)), offsets, norm)
        m = len(live)
        lengths = _norms(d, norm).clamp_min(1e-8)
        alpha = per_image((lengths[:m] / (lengths[:m] + lengths[m:])).clamp(0.0, alpha_max), z)
        ahead, from_x = z + eta * d[:m].view_as(z), xs + eta * d[m:].view_as(z)  # η: overshoot
        z = (ahead * (1 - alpha) + from_x * alpha).clamp(0.0, 1.0)
        with torch.no_grad():
            predicted = model(z).argmax(1)
        won = predicted == aims if targeted else predicted != ys
        size = _norms(z - xs, norm)
        better = won & (size < best_norm[live])
        best[live[better]] = z[better]
        best_norm[live[better]] = size[better]
        z = torch.where(per_image(won, z), xs + (z - xs) * beta, z)
        running = best_norm[live] > eps
        if not running.all():
            live, z, xs, ys, aims = live[running], z[running], xs[running], ys[running], aims[running]
    return best, best_norm


@per_eps
def fab(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    steps: int,
    restarts: int,
    n_targets: int,
    alpha_max: float,
    eta: float,
    beta: float,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """FAB-T at radius `eps` in `norm` ("linf" or "l2"): per image, the smallest adversarial found
    if its norm is ≤ eps, else x unchanged.

    Untargeted (AutoAttack's FAB-T): for each of the `n_targets` runner-up classes of the clean
    logits in turn (at most classes − 1), `restarts` runs of `steps` steps towards it, each only on
    the images not yet broken within eps; success is argmax ≠ y, whatever the class. Targeted
    (`target`, one class per image): the runs go towards `target` only and success is
    argmax == target. Images the clean prediction already fools (argmax ≠ y) are returned as x.
    Every run after an image's first starts from a random point (`seeds`: one int per image; an
    image's draw depends only on its seed, the target's rank and the restart; without them the
    global torch generator is used). `info["min_norm"]` gets each image's smallest adversarial norm
    found — NaN where none, and for images misclassified on x (not attacked) — an upper bound of
    FAB's own minimum where an adversarial within eps ended the image's runs early.
    """
    check_norm(norm)
    if targeted and target is None:
        raise ValueError("a targeted attack needs `target` (a class index per image)")
    if steps < 0 or restarts < 1 or n_targets < 1:
        raise ValueError(f"steps={steps} must be ≥ 0, restarts={restarts} and n_targets={n_targets} ≥ 1")
    if not (0.0 <= alpha_max <= 1.0 and eta > 0.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"alpha_max={alpha_max} and beta={beta} must lie in [0, 1], eta={eta} be > 0")
    x = x.detach()
    with torch.no_grad():
        clean = model(x)
        attacked = clean.argmax(1) == y
        if targeted:
            assert target is not None  # checked above
            aims = [target]
        else:
            ranked = clean.sort(dim=1).indices  # ascending, as the original ranks the targets
            aims = [ranked[:, -(k + 2)] for k in range(min(n_targets, clean.shape[1] - 1))]
        best, best_norm = x.clone(), torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
        for k, aim in enumerate(aims):
            for restart in range(restarts):
                todo = (attacked & ~(best_norm <= eps)).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                xs = x[todo]
                if restart == 0:
                    start = xs
                else:
                    radius = START_RADIUS * best_norm[todo].clamp_max(eps)
                    draws = None if seeds is None else seeds[todo.cpu()]
                    start = _start(xs, radius, norm, draws, k * restarts + restart)
                adv, size = _run(
                    model, xs, y[todo], aim[todo], start, eps, norm, steps, alpha_max, eta, beta, targeted
                )
                better = size < best_norm[todo]
                best[todo[better]] = adv[better]
                best_norm[todo[better]] = size[better]
        if info is not None:
            info["min_norm"] = torch.where(
                best_norm.isfinite(), best_norm, torch.full_like(best_norm, float("nan"))
            )
        return torch.where(per_image(best_norm <= eps, x), best, x)
