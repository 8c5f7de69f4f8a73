"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): a score-based black-box
attack by random search, in the L∞ and L2 balls.

The model is only ever queried for its logits, under `torch.inference_mode()`: no gradient can be
taken through it. From a random start on the ball's boundary (L∞: vertical stripes of ±eps; L2:
a grid of ±"pseudo-gaussian" bumps scaled to norm eps), every iteration proposes, per image, a
change confined to one random square of side s (L∞: the square set to ±eps per channel; L2: mass
moved into the square from a second one, keeping the norm at eps) and keeps it if the loss falls
(margin loss untargeted, cross-entropy to the target targeted) or the image is fooled. The side s
follows the original piecewise-constant schedule of p, the fraction of pixels changed, decaying
from `p_init` with the iteration number; as in AutoAttack the schedule is not rescaled to the
query budget (`resc_schedule=False`).

Every random draw of an image — stripes, bumps, square positions, signs — comes from a
counter-based hash of (its seed, the restart, the iteration, the draw), so an image's attack does
not depend on the batch it is in. Successful images stop querying at once (early exit).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks.losses import succeeded
from pipeline.attacks.projection import check_norm, per_eps, per_image

# the original's schedule: after iteration `it` (> the bound) p is p_init / divisor
P_SCHEDULE = (
    (8000, 512),
    (6000, 256),
    (4000, 128),
    (2000, 64),
    (1000, 32),
    (500, 16),
    (200, 8),
    (50, 4),
    (10, 2),
)
NORM_GUARD = 1e-12  # the original's guard against dividing by a zero norm

# splitmix64 (Steele, Lea & Flood 2014) on int64 tensors: constants as signed 64-bit integers
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX_2 = 0x94D049BB133111EB - 2**64


def _wrap(value: int) -> int:
    """A Python int as the signed 64-bit integer with the same low 64 bits."""
    return (value + 2**63) % 2**64 - 2**63


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values: torch's `>>` is arithmetic."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, a bijection of 64-bit integers (int64 arithmetic wraps mod 2⁶⁴)."""
    z = (z ^ _shift_right(z, 30)) * _MIX_1
    z = (z ^ _shift_right(z, 27)) * _MIX_2
    return z ^ _shift_right(z, 31)


def uniforms(seeds: torch.Tensor, counters: tuple[int, ...], n: int) -> torch.Tensor:
    """(B, n) float32 uniforms in [0, 1), row b a function of (seeds[b], *counters) only: the
    counters are hashed into each seed's key, then draw j is the top 24 bits of mix64(key + j·γ)."""
    key = seeds
    for counter in counters:
        key = mix64(key + _wrap((counter + 1) * _GOLDEN))
    draws = torch.arange(1, n + 1, device=seeds.device, dtype=torch.int64) * _GOLDEN
    bits = _shift_right(mix64(key[:, None] + draws), 40)
    return bits.to(torch.float32) * 2.0**-24


def _signs(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u < 0.5, -1.0, 1.0)


def _positions(u: torch.Tensor, room: int) -> torch.Tensor:
    """Uniform offsets in [0, room) as the original draws them (0 when room is 0)."""
    return (u * room).long().clamp_max(max(room - 1, 0))


def p_selection(p_init: float, it: int) -> float:
    """The fraction of pixels the square covers at iteration `it` (0-based)."""
    for bound, divisor in P_SCHEDULE:
        if it > bound:
            return p_init / divisor
    return p_init


@functools.cache
def _bump_rectangle(rows: int, cols: int) -> torch.Tensor:
    """Concentric rectangles of weight 1/(k+1)² around the centre, unit L2 norm."""
    delta = torch.zeros(rows, cols, dtype=torch.float64)
    top, left = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(top, 0) : min(top + 2 * k + 1, rows), max(left, 0) : min(left + 2 * k + 1, cols)] += (
            1.0 / (k + 1) ** 2
        )
        top, left = top - 1, left - 1
    return delta / delta.square().sum().sqrt()


@functools.cache
def _bump(s: int) -> torch.Tensor:
    """The (s, s) "meta pseudo-gaussian" perturbation: a positive bump over the top half, a negative
    one over the bottom half, unit L2 norm (each image transposes it at random)."""
    delta = torch.zeros(s, s, dtype=torch.float64)
    if s // 2:
        delta[: s // 2] = _bump_rectangle(s // 2, s)
    delta[s // 2 :] = -_bump_rectangle(s - s // 2, s)
    return delta / delta.square().sum().sqrt()


def _bumps(s: int, flip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n, s, s): the bump of side s, transposed where `flip`."""
    bump = _bump(s).to(like.device, like.dtype)
    return torch.where(flip[:, None, None], bump.T, bump)


def _objective(
    logits: torch.Tensor, y: torch.Tensor, targeted: bool, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, success), per image: the margin Z_y − max_{i≠y} Z_i untargeted,
    cross-entropy to the target targeted (as the original); success is `succeeded`."""
    if targeted:
        assert target is not None  # `square` rejects a targeted attack without `target`
        loss = F.cross_entropy(logits, target, reduction="none")
    else:
        own = logits.gather(1, y[:, None])[:, 0]
        loss = own - logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return loss, succeeded(logits, y, targeted, target)


def _l2_normalise(delta: torch.Tensor) -> torch.Tensor:
    return delta / per_image(delta.flatten(1).norm(dim=1) + NORM_GUARD, delta)


def _square_mask(vh: torch.Tensor, vw: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """(n, 1, h, w) bool: each image's square of side s at (vh, vw)."""
    rows = torch.arange(h, device=vh.device)
    cols = torch.arange(w, device=vw.device)
    in_rows = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
    in_cols = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _window(vh: torch.Tensor, vw: torch.Tensor, s: int) -> tuple[torch.Tensor, ...]:
    """Advanced indices of each image's (s, s) window into a channels-last (n, h, w, c) view."""
    steps = torch.arange(s, device=vh.device)
    batch = torch.arange(len(vh), device=vh.device)[:, None, None]
    return batch, (vh[:, None] + steps)[:, :, None], (vw[:, None] + steps)[:, None, :]


def _linf_init(x, eps, seeds, restart):
    b, c, _, w = x.shape
    stripes = _signs(uniforms(seeds, (restart, 0), c * w)).to(x.dtype).view(b, c, 1, w)
    return (x + eps * stripes).clamp(0.0, 1.0)


def _linf_step(x, x_best, eps, seeds, restart, it, p_init):
    n, c, h, w = x.shape
    s = min(max(round(math.sqrt(p_selection(p_init, it) * h * w)), 1), h, w)
    u = uniforms(seeds, (restart, it + 1), c + 2)
    mask = _square_mask(_positions(u[:, 0], h - s), _positions(u[:, 1], w - s), s, h, w)
    signs = _signs(u[:, 2:]).to(x.dtype).view(n, c, 1, 1)
    proposal = torch.where(mask, x_best + 2.0 * eps * signs, x_best)
    return torch.minimum(torch.maximum(proposal, x - eps), x + eps).clamp(0.0, 1.0)


def _l2_init(x, eps, seeds, restart):
    b, c, h, w = x.shape
    s = max(h // 5, 1)
    start = (h - 5 * s) // 2
    grid = [(start + i * s, start + j * s) for i in range(h // s) for j in range(w // s)]
    u = uniforms(seeds, (restart, 0), len(grid) * (c + 1)).view(b, len(grid), c + 1)
    delta = torch.zeros_like(x)
    for k, (vh, vw) in enumerate(grid):
        window = delta[:, :, vh : vh + s, vw : vw + s]
        bumps = _bumps(s, u[:, k, 0] < 0.5, x)[:, None, : window.shape[2], : window.shape[3]]
        window += bumps * _signs(u[:, k, 1:]).to(x.dtype)[:, :, None, None]
    return (x + _l2_normalise(delta) * eps).clamp(0.0, 1.0)


def _l2_step(x, x_best, eps, seeds, restart, it, p_init):
    n, c, h, w = x.shape
    s = max(round(math.sqrt(p_selection(p_init, it) * h * w)), 3)
    s = min(s + 1 if s % 2 == 0 else s, h, w)
    u = uniforms(seeds, (restart, it + 1), c + 5)
    vh, vw = _positions(u[:, 0], h - s), _positions(u[:, 1], w - s)
    vh2, vw2 = _positions(u[:, 2], h - s), _positions(u[:, 3], w - s)
    delta = x_best - x
    first = _window(vh, vw, s)
    old = delta.permute(0, 2, 3, 1)[first].permute(0, 3, 1, 2)  # (n, c, s, s)
    old_norms = old.square().sum((2, 3), keepdim=True).sqrt()
    image_norms = per_image(delta.flatten(1).norm(dim=1), delta)
    both = _square_mask(vh, vw, s, h, w) | _square_mask(vh2, vw2, s, h, w)
    window_norms = per_image((delta * both).flatten(1).norm(dim=1), delta)
    new = _bumps(s, u[:, 4] < 0.5, x)[:, None] * _signs(u[:, 5:]).to(x.dtype).view(n, c, 1, 1)
    new = new + old / (NORM_GUARD + old_norms)
    room = ((eps**2 - image_norms.square()).clamp_min(0.0) / c + window_norms.square()).sqrt()
    new = new / (NORM_GUARD + new.square().sum((2, 3), keepdim=True).sqrt()) * room
    delta = delta * ~_square_mask(vh2, vw2, s, h, w)  # the second window emptied ...
    delta.permute(0, 2, 3, 1)[first] = new.permute(0, 2, 3, 1)  # ... the first one rewritten
    return (x + _l2_normalise(delta) * eps).clamp(0.0, 1.0)


def _single_run(model, x, y, eps, norm, queries, p_init, targeted, target, seeds, restart):
    """One restart on images not yet fooled: (x_best, loss, success, queries used), per image."""
    init, step = (_linf_init, _linf_step) if norm == "linf" else (_l2_init, _l2_step)
    x_best = init(x, eps, seeds, restart)
    loss_best, success = _objective(model(x_best), y, targeted, target)
    used = torch.ones(len(x), device=x.device)
    for it in range(queries - 1):
        active = (~success).nonzero()[:, 0]
        if len(active) == 0:
            break
        t = None if target is None else target[active]
        x_new = step(x[active], x_best[active], eps, seeds[active], restart, it, p_init)
        loss, won = _objective(model(x_new), y[active], targeted, t)
        accept = (loss < loss_best[active]) | won
        x_best[active] = torch.where(per_image(accept, x_new), x_new, x_best[active])
        loss_best[active] = torch.where(accept, loss, loss_best[active])
        success[active] = won
        used[active] += 1
    return x_best, loss_best, success, used


@per_eps
def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    queries: int,
    p_init: float,
    restarts: int,
    targeted: bool = False,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Square Attack in the `norm` ball of radius `eps` ("linf" or "l2"), at most `queries` model
    evaluations per image and restart (the random start counts as one), squares covering a
    fraction `p_init` of the image at first.

    Images the model already gets wrong (untargeted) or already puts in the target class
    (targeted) are returned unchanged, with 0 queries. Each restart attacks only the images no
    earlier one fooled; every image keeps its worst case: a success over a failure, then the lower
    loss. `seeds` (one int per image) fixes an image's random draws whatever its batch; without it
    the seeds are drawn from the global torch generator. With `info`, info["queries"] is each
    image's number of model evaluations over all restarts (the clean check not counted).

    Black-box: the model only sees inputs under `torch.inference_mode()`, so no gradient exists.
    """
    check_norm(norm)
    if targeted and target is None:
        raise ValueError("a targeted attack needs `target` (a class index per image)")
    if queries < 1 or restarts < 1 or not 0.0 < p_init <= 1.0:
        raise ValueError(f"queries={queries} and restarts={restarts} must be ≥ 1, p_init={p_init} in (0, 1]")
    if x.dim() != 4:
        raise ValueError(f"square attacks images (B, C, H, W); got a batch of shape {tuple(x.shape)}")
    x = x.detach()
    if seeds is None:
        seeds = torch.randint(0, 2**62, (len(x),))
    if len(seeds) != len(x):
        raise ValueError(f"{len(seeds)} seeds for {len(x)} images: pass one seed per image")
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=x.device)
    with torch.inference_mode():
        loss_best, success = _objective(model(x), y, targeted, target)
        loss_best = torch.full_like(loss_best, float("inf"))  # the clean image is no candidate
        best, used = x.clone(), torch.zeros(len(x), device=x.device)
        for restart in range(restarts):
            todo = (~success).nonzero()[:, 0]
            if len(todo) == 0:
                break
            t = None if target is None else target[todo]
            z, loss, won, n = _single_run(
                model, x[todo], y[todo], eps, norm, queries, p_init, targeted, t, seeds[todo], restart
            )
            better = won | (loss < loss_best[todo])  # none of `todo` has succeeded before
            best[todo] = torch.where(per_image(better, z), z, best[todo])
            loss_best[todo] = torch.where(better, loss, loss_best[todo])
            success[todo] = won
            used[todo] += n
    if info is not None:
        info["queries"] = used.clone()  # clones: normal tensors, not inference ones
    return best.clone()
