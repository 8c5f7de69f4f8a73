"""Target classes for targeted attacks, chosen by a named strategy or fixed."""

from __future__ import annotations

import torch


def random_offsets(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """A seeded offset in 1..num_classes-1 per eval image, so a random target is never the true class."""
    return torch.randint(1, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def next_class(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class after each label, (y + 1) mod C: the default target of targeted attacks."""
    return (y + 1) % num_classes


def choose_targets(
    strategy: str | int, y: torch.Tensor, clean_logits: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Target per image (B,): `next` = (y+1) mod C, `random` = (y+offset) mod C,
    `least_likely` = argmin of the clean logits, an int = that class for every image."""
    num_classes = clean_logits.shape[1]
    if isinstance(strategy, int):
        return torch.full_like(y, strategy)
    if strategy == "next":
        return next_class(y, num_classes)
    if strategy == "random":
        assert offsets is not None  # callers pass the offsets with the `random` strategy
        return (y + offsets.to(y.device)) % num_classes
    if strategy == "least_likely":
        return clean_logits.argmin(1)
    raise ValueError(f"unknown target strategy {strategy!r}")
