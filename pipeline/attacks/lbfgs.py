"""Szegedy et al.'s box-constrained L-BFGS attack, batched: every image is its own problem.

For each image, minimise  ||r||² + c · loss(f(x + r))  over the box  0 ≤ x + r ≤ 1,  and search
over c per image: grow c tenfold until the minimiser is adversarial, then bisect between the
largest failing and the smallest succeeding c. (This puts c on the loss, as AdverTorch does; the
paper's c on ||r|| is the same family with c ↦ 1/c.) The smallest-L2 adversarial seen at any
evaluated point is kept.

The solver is a projected L-BFGS run on the model's device: every image has its own c, its own
curvature history and its own backtracking line search, and leaves the batch when it has
converged. Variables at a bound whose gradient points outwards are held fixed; the box is kept
by projection after each step, never by clamping inside the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from pipeline.attacks.losses import attack_loss, succeeded

# evaluate(z, rows) -> objective (n,), gradient (n, D), logits (n, K) for batch rows `rows`
Evaluate = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _two_loop(
    q: torch.Tensor,
    S: torch.Tensor,
    Y: torch.Tensor,
    rho: torch.Tensor,
    gamma: torch.Tensor,
    newest_first: list[int],
) -> torch.Tensor:
    """H·q for each row's L-BFGS inverse-Hessian estimate. q (n, D); S, Y (n, m, D); rho (n, m),
    0 where a slot holds no accepted pair; gamma (n,) the initial scaling."""
    alphas = []
    for j in newest_first:
        a = rho[:, j] * (S[:, j] * q).sum(1)
        q = q - a[:, None] * Y[:, j]
        alphas.append(a)
    r = gamma[:, None] * q
    for j, a in zip(reversed(newest_first), reversed(alphas), strict=True):
        b = rho[:, j] * (Y[:, j] * r).sum(1)
        r = r + (a - b)[:, None] * S[:, j]
    return r


def _line_search(
    evaluate: Evaluate, rows: torch.Tensor, z, f, g, logits, d, step, tries: int = 20, c1: float = 1e-4
):
    """Projected backtracking (Armijo) per row: halve the row's step until
    f(P(z + step·d)) ≤ f(z) + c1·g·(P(z + step·d) − z). Returns the new point, objective,
    gradient, logits, and which rows found one."""
    z_new, f_new, g_new, logits_new = z.clone(), f.clone(), g.clone(), logits.clone()
    found = torch.zeros(len(z), dtype=torch.bool, device=z.device)
    pending = torch.arange(len(z), device=z.device)
    for _ in range(tries):
        trial = (z[pending] + step[pending, None] * d[pending]).clamp_(0, 1)
        f_t, g_t, logits_t = evaluate(trial, rows[pending])
        accept = f_t <= f[pending] + c1 * (g[pending] * (trial - z[pending])).sum(1)
        done = pending[accept]
        z_new[done], f_new[done], g_new[done], logits_new[done] = (
            trial[accept],
            f_t[accept],
            g_t[accept],
            logits_t[accept],
        )
        found[done] = True
        pending = pending[~accept]
        if len(pending) == 0:
            break
        step[pending] *= 0.5
    return z_new, f_new, g_new, logits_new, found


def _minimise(
    evaluate: Evaluate,
    z: torch.Tensor,
    rows: torch.Tensor,
    history: int,
    max_iter: int,
    ftol: float,
    gtol: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected L-BFGS for each row of z (n, D) independently; returns the final points and
    their logits. A row stops at a small projected gradient, a small relative decrease of its
    objective, a failed line search, or after `max_iter` iterations."""
    n, dim = z.shape
    f, g, logits = evaluate(z, rows)
    out_z, out_logits = z.clone(), logits.clone()
    live = torch.arange(n, device=z.device)  # positions in out_* of the rows still running
    S, Y = z.new_zeros(n, history, dim), z.new_zeros(n, history, dim)
    rho, gamma = z.new_zeros(n, history), z.new_ones(n)
    for it in range(max_iter):
        free = ~(((z <= 0) & (g > 0)) | ((z >= 1) & (g < 0)))  # not pinned at a bound
        q = g * free
        newest_first = [(it - 1 - k) % history for k in range(min(it, history))]
        d = -_two_loop(q, S, Y, rho, gamma, newest_first) * free
        uphill = (g * d).sum(1) >= 0
        d[uphill] = -q[uphill]
        step = torch.ones(len(z), device=z.device)
        if it == 0:  # no curvature yet: a first step of unit length
            step = (1 / q.norm(dim=1).clamp_min(1e-12)).clamp_max(1.0)
        z_new, f_new, g_new, logits_new, found = _line_search(evaluate, rows[live], z, f, g, logits, d, step)

        s, y_diff = z_new - z, g_new - g
        sy, yy = (s * y_diff).sum(1), (y_diff * y_diff).sum(1)
        curved = found & (sy > 1e-10 * yy) & (yy > 0)  # keep only pairs with positive curvature
        slot = it % history
        S[:, slot], Y[:, slot] = s * curved[:, None], y_diff * curved[:, None]
        rho[:, slot] = torch.where(curved, 1 / sy.where(curved, torch.ones_like(sy)), 0)
        gamma = torch.where(curved, sy / yy.where(curved, torch.ones_like(yy)), gamma)

        decrease = (f - f_new) / torch.maximum(f.abs(), f_new.abs()).clamp_min(1)
        z, f, g, logits = z_new, f_new, g_new, logits_new
        free = ~(((z <= 0) & (g > 0)) | ((z >= 1) & (g < 0)))
        finished = ~found | (decrease <= ftol) | ((g * free).abs().amax(1) <= gtol)
        if finished.any():
            out_z[live[finished]], out_logits[live[finished]] = z[finished], logits[finished]
            keep = ~finished
            live, z, f, g, logits = live[keep], z[keep], f[keep], g[keep], logits[keep]
            S, Y, rho, gamma = S[keep], Y[keep], rho[keep], gamma[keep]
            if len(live) == 0:
                break
    out_z[live], out_logits[live] = z, logits
    return out_z, out_logits


def next_c(
    c: torch.Tensor, low: torch.Tensor, high: torch.Tensor, success: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the per-image search over c (all (n,)): a success lowers the upper bound to
    c, a failure raises the lower bound to c; the next c is the midpoint once an upper bound
    exists, ten times c before. Returns (c, low, high)."""
    high = torch.where(success, torch.minimum(high, c), high)
    low = torch.where(success, low, torch.maximum(low, c))
    c = torch.where(torch.isfinite(high), (low + high) / 2, c * 10)
    return c, low, high


def lbfgs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None = None,
    targeted: bool = False,
    *,
    c_init: float,
    c_steps: int,
    max_iter: int,
    history: int,
    ftol: float,
    gtol: float = 1e-5,
    warm_start: bool,
    info: dict | None = None,
) -> torch.Tensor:
    """The smallest-L2 adversarial found for each image (the image itself where none was found).

    Targeted: the loss is cross-entropy towards `target`; untargeted: −log(1 − p_y), success
    meaning any class but y. `c_steps` values of c are tried per image: c_init, then ×10 until
    success, then bisection. Starting near the usual final c (about 1 for [0,1] images and a
    cross-entropy loss) leaves most steps for the bisection, which is what sets the L2. Each c
    is solved with at most `max_iter` L-BFGS iterations keeping `history` curvature pairs; an
    image's solve stops early once an iteration lowers its objective by less than `ftol`
    (relative) or its projected gradient is below `gtol`. `warm_start` starts each c from the
    previous c's solution instead of from x. If `info` is a dict it receives `c_final` (B,):
    the c of the kept adversarial (NaN where none was found).
    """
    if targeted and target is None:
        raise ValueError("targeted lbfgs needs `target` (a class index per image)")
    shape = x.shape
    x0 = x.detach().flatten(1)  # (B, D)
    n = len(x0)

    def per_image(value: float) -> torch.Tensor:
        return torch.full((n,), value, dtype=x.dtype, device=x.device)

    c = per_image(c_init)
    best, best_l2, best_c = x0.clone(), per_image(math.inf), per_image(math.nan)

    def evaluate(z: torch.Tensor, rows: torch.Tensor):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z.view(-1, *shape[1:]))
            # targeted implies a `target` (checked on entry)
            t = cast(torch.Tensor, target)[rows] if targeted else None
            distance = (z - x0[rows]).pow(2).sum(1)
            objective = distance + c[rows] * attack_loss(logits, y[rows], targeted, t)
            (grad,) = torch.autograd.grad(objective.sum(), z)
        with torch.no_grad():  # keep the smallest successful point seen anywhere
            better = succeeded(logits, y[rows], targeted, t) & (distance < best_l2[rows])
            hit = rows[better]
            best[hit], best_l2[hit], best_c[hit] = z[better], distance[better], c[hit]
        return objective.detach(), grad, logits.detach()

    with torch.no_grad():
        # images that are already adversarial need no search
        searching = ~succeeded(model(x), y, targeted, target)
        best_l2[~searching], best_c[~searching] = 0.0, float("nan")
    low, high = per_image(0.0), per_image(math.inf)
    start = x0.clone()
    rows = searching.nonzero().squeeze(1)
    for _ in range(c_steps if len(rows) else 0):
        z, logits = _minimise(evaluate, start[rows], rows, history, max_iter, ftol, gtol)
        if warm_start:
            start[rows] = z
        # targeted implies a `target` (checked on entry)
        win = succeeded(logits, y[rows], targeted, cast(torch.Tensor, target)[rows] if targeted else None)
        c[rows], low[rows], high[rows] = next_c(c[rows], low[rows], high[rows], win)
    if info is not None:
        info["c_final"] = best_c
    return best.view(shape).detach()
