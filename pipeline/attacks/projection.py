"""Projections onto the threat model (an Lp ball around x, intersected with the [0,1] box), random
starts inside it, and the eps-list convention shared by the eps-budget attacks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

NORMS = ("linf", "l2")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}; use one of {', '.join(NORMS)}")


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1, ...) to broadcast against `like`."""
    return values.view(-1, *[1] * (like.dim() - 1))


def project(x: torch.Tensor, z: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The point of {x + δ : ||δ|| ≤ eps} ∩ [0,1] reached from z by clipping δ to the ball (Linf:
    per pixel; L2: rescaling δ onto the sphere when it lies outside), then x + δ to the box.
    Clipping to the box only shrinks |δ| per pixel, so the result stays in both sets."""
    delta = z - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(p=2, dim=1)
        scale = torch.where(norms > eps, eps / norms.clamp_min(1e-30), torch.ones_like(norms))
        delta = delta * per_image(scale, delta)
    return (x + delta).clamp(0.0, 1.0)


def l2_normalise(grad: torch.Tensor) -> torch.Tensor:
    """Each image's gradient scaled to unit L2 norm (a zero gradient stays zero)."""
    return grad / per_image(grad.flatten(1).norm(p=2, dim=1) + 1e-10, grad)


def seeded_noise(
    norm: str,
    n: int,
    size: int,
    seeds: torch.Tensor | None,
    key: tuple,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n, size) noise for random starts: uniform in [0,1) for "linf", standard normal for "l2".
    With `seeds` (one int per image) row i comes from its own generator seeded by
    (seeds[i], *key), so it depends only on that image's seed and `key`, never on its batch;
    without them all rows come from the global generator (drawn in `dtype`)."""
    draw = torch.rand if norm == "linf" else torch.randn
    if seeds is None:
        return draw((n, size), device=device, dtype=dtype)
    rows = [
        draw(size, generator=torch.Generator().manual_seed(hash((int(s), *key)) % 2**63))
        for s in seeds.tolist()
    ]
    return torch.stack(rows).to(device, dtype) if rows else torch.empty(0, size, device=device, dtype=dtype)


def random_point(
    x: torch.Tensor, eps: float, norm: str, seeds: torch.Tensor | None, restart: int
) -> torch.Tensor:
    """A random point of the threat model around x: Linf uniform in the cube; L2 a uniformly random
    direction at a radius drawn uniformly from [0, eps]. With `seeds` (one int per image) each
    image's draw depends only on its seed and the restart, never on the batch it is in; without
    them the global torch generator is used."""
    # per image: the pixels' noise, then a radius
    noise = seeded_noise(norm, len(x), x[0].numel() + 1, seeds, (restart,), x.device)
    noise = noise.to(x.dtype)
    if norm == "linf":
        delta = (2 * noise[:, :-1] - 1) * eps
    else:
        radius = torch.special.ndtr(noise[:, -1:]) * eps  # a normal draw mapped to uniform [0, 1]
        delta = l2_normalise(noise[:, :-1]) * radius
    return (x + delta.view_as(x)).clamp(0.0, 1.0)


def per_eps(attack: Callable) -> Callable:
    """Let `attack(model, x, y, eps, ...)` take a sequence of eps and return one adversarial
    batch per eps (the attack runs once per value)."""

    @functools.wraps(attack)
    def wrapper(model, x, y, eps, *args, **kwargs):
        if isinstance(eps, Sequence):
            return [attack(model, x, y, float(e), *args, **kwargs) for e in eps]
        return attack(model, x, y, eps, *args, **kwargs)

    return wrapper
