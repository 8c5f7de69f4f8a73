"""Per-image classification losses the optimisation attacks minimise, and their success test."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attack_loss(
    logits: torch.Tensor, y: torch.Tensor, targeted: bool, target: torch.Tensor | None
) -> torch.Tensor:
    """(B,) loss to minimise. Targeted: cross-entropy towards `target`. Untargeted: push the
    true class down, −log(1 − p_y) = logsumexp(all) − logsumexp(classes ≠ y); bounded below
    by 0, unlike −CE(y)."""
    if targeted:
        assert target is not None  # every caller rejects a targeted attack without `target`
        return F.cross_entropy(logits, target, reduction="none")
    others = logits.scatter(1, y[:, None], float("-inf"))
    return logits.logsumexp(1) - others.logsumexp(1)


def succeeded(
    logits: torch.Tensor, y: torch.Tensor, targeted: bool, target: torch.Tensor | None
) -> torch.Tensor:
    """(B,) bool: classified as the target (targeted) or as anything but y (untargeted)."""
    predicted = logits.argmax(1)
    if targeted:
        assert target is not None  # every caller rejects a targeted attack without `target`
        return predicted == target
    return predicted != y
