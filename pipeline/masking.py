"""Gradient-masking checks (Athalye, Carlini & Wagner 2018's checklist, automated): a defence whose
gradients mislead the white-box attacks shows up as a black-box or transfer attack succeeding where
they failed, or as an attack that cannot fool the model even when the budget allows any image.

Each check reads one attack job's per-image outcomes and returns the suspicions it finds; the run
tags itself `masking_suspect` and prints them as warnings. They change no number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from pipeline.attacks.ensemble import BROKEN_BY

BLACK_BOX = ("square",)  # attacks that use only the model's outputs


@dataclass(frozen=True)
class Suspicion:
    check: str  # blackbox | transfer | unbounded
    count: int  # images (or, for `unbounded`, percent of images) behind the suspicion
    message: str


def blackbox_beats_whitebox(
    samples: Mapping[str, torch.Tensor], parts: Sequence[Mapping], tolerance: float
) -> Suspicion | None:
    """An ensemble's black-box components (Square) broke more than `tolerance` of the images
    after every white-box component before them had failed on those images."""
    if BROKEN_BY not in samples:
        return None
    broken_by = samples[BROKEN_BY]
    blind = [i for i, p in enumerate(parts) if p["attack"] in BLACK_BOX]
    count = int(sum(int((broken_by == i).sum()) for i in blind))
    if count <= tolerance * len(broken_by) or count == 0:
        return None
    names = ", ".join(str(parts[i]["name"]) for i in blind)
    return Suspicion(
        "blackbox",
        count,
        f"{names} (black-box) broke {count} of {len(broken_by)} images that every white-box "
        "attack before it failed on: the gradients may be masked",
    )


def transfer_beats_whitebox(samples: Mapping[str, torch.Tensor], tolerance: float) -> Suspicion | None:
    """Adversarials crafted on a surrogate fooled more than `tolerance` of the images on which
    the same attack, white-box on the attacked model, failed."""
    if "whitebox_success" not in samples:
        return None
    count = int((samples["success"] & ~samples["whitebox_success"]).sum())
    n = len(samples["success"])
    if count <= tolerance * n or count == 0:
        return None
    return Suspicion(
        "transfer",
        count,
        f"the transfer attack fooled {count} of {n} images the white-box attack failed on: "
        "the gradients may be masked",
    )


def unbounded_not_reached(
    eps: Sequence[float | None],
    norm: str,
    metrics: Sequence[Mapping[str, float]],
    unbounded_eps: float,
    unbounded_accuracy: float,
) -> Suspicion | None:
    """At an L∞ radius of at least `unbounded_eps` an attack can reach images of any class, so
    the adversarial accuracy should be ~0; above `unbounded_accuracy` it is suspect."""
    if norm != "linf":
        return None
    for e, m in zip(eps, metrics, strict=True):
        if e is not None and e >= unbounded_eps and m["adv_accuracy"] > unbounded_accuracy:
            return Suspicion(
                "unbounded",
                round(100 * m["adv_accuracy"]),
                f"adversarial accuracy is still {m['adv_accuracy']:.1%} at eps={e:g}, a budget "
                "that allows any image: the attack is not reaching the model (masked gradients "
                "or a broken attack)",
            )
    return None
