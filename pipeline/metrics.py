"""Distances, per-image attack outcomes and their aggregates: the one place norms and success are computed."""

from __future__ import annotations

import torch

# metric keys of an attack run, in the order they are reported; attacks without an
# eps budget (lbfgs, szegedy_sgd) have no `eps`
METRIC_KEYS = (
    "clean_accuracy",
    "adv_accuracy",
    "success_rate",
    "l2_mean",
    "l2_median",
    "linf_mean",
    "linf_max",
    "l0_mean",
    "confidence_adv_mean",
    "eps",
    "attack_seconds",
    "images_per_second",
)
# further keys on every attack run
EXTRA_KEYS = (
    "szegedy_distortion_mean",
    "top5_success_rate",
    "confidence_clean_mean",
    "forward_passes_per_image",
    "backward_passes_per_image",
)
# further keys of attacks without an eps budget (minimal-perturbation attacks: lbfgs, cw_l2, ...)
MIN_NORM_KEYS = ("min_l2_mean", "min_l2_median")


def l0(delta: torch.Tensor) -> torch.Tensor:
    """Number of changed elements per image: (B, ...) → (B,)."""
    return (delta.flatten(1) != 0).sum(1).float()


def l2(delta: torch.Tensor) -> torch.Tensor:
    """Euclidean norm per image: (B, ...) → (B,)."""
    return delta.flatten(1).norm(p=2, dim=1)


def linf(delta: torch.Tensor) -> torch.Tensor:
    """Largest absolute change per image: (B, ...) → (B,)."""
    return delta.flatten(1).abs().amax(1)


def szegedy_distortion(delta: torch.Tensor) -> torch.Tensor:
    """Szegedy et al.'s distortion sqrt(sum(r²) / n), n = values per image: (B, ...) → (B,)."""
    return l2(delta) / delta[0].numel() ** 0.5


def _prediction(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class (argmax of the logits, as the attacks decide success) and its softmax
    probability. (The argmax of the softmax can differ: float32 rounds logits within ~1e-7 of
    each other to equal probabilities.)"""
    pred = logits.argmax(1)
    return pred, logits.softmax(1).gather(1, pred[:, None]).squeeze(1)


def per_sample(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-image outcome of one attack on a batch; every value has shape (B,).

    `success` holds only for images the model gets right when clean: untargeted, the
    adversarial is misclassified; targeted, it is classified as `target`.
    """
    delta = (x_adv - x).detach()
    clean_pred, clean_conf = _prediction(clean_logits)
    adv_pred, adv_conf = _prediction(adv_logits)
    clean_correct = clean_pred == y
    fooled = adv_pred == target if target is not None else adv_pred != y
    top5 = adv_logits.topk(min(5, adv_logits.shape[1]), dim=1).indices  # (B, 5)
    return {
        "clean_pred": clean_pred,
        "clean_confidence": clean_conf,
        "adv_pred": adv_pred,
        "adv_confidence": adv_conf,
        "clean_correct": clean_correct,
        "adv_correct": adv_pred == y,
        "success": clean_correct & fooled,
        "top5_success": clean_correct & (top5 != y[:, None]).all(1),  # y left the top 5
        "l0": l0(delta),
        "l2": l2(delta),
        "linf": linf(delta),
        "distortion": szegedy_distortion(delta),
    }


def summarize(samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Aggregate per-image outcomes of every eval image into the run's metrics.

    Accuracies, confidences and norms are over all eval images; `success_rate` and
    `top5_success_rate` (the true class left the top 5) over the clean-correct ones only (NaN if
    there are none); `szegedy_distortion_mean` over the successful ones (Szegedy et al.'s
    "average minimum distortion"; NaN if there are none).
    """
    n_correct = int(samples["clean_correct"].sum())

    def rate(key: str) -> float:  # among the clean-correct images
        return samples[key].sum().item() / n_correct if n_correct else float("nan")

    distortion = samples["distortion"][samples["success"]]
    return {
        "clean_accuracy": samples["clean_correct"].float().mean().item(),
        "adv_accuracy": samples["adv_correct"].float().mean().item(),
        "success_rate": rate("success"),
        "top5_success_rate": rate("top5_success"),
        "l2_mean": samples["l2"].mean().item(),
        "l2_median": samples["l2"].median().item(),
        "linf_mean": samples["linf"].mean().item(),
        "linf_max": samples["linf"].max().item(),
        "l0_mean": samples["l0"].mean().item(),
        "confidence_adv_mean": samples["adv_confidence"].mean().item(),
        "confidence_clean_mean": samples["clean_confidence"].mean().item(),
        "szegedy_distortion_mean": distortion.mean().item() if len(distortion) else float("nan"),
    }


def min_norm_summary(samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean and median L2 of the successful adversarials of a minimal-perturbation attack: the
    per-image minimal norm it found (NaN if no image succeeded)."""
    found = samples["l2"][samples["success"]]
    if len(found) == 0:
        return {key: float("nan") for key in MIN_NORM_KEYS}
    return {"min_l2_mean": found.mean().item(), "min_l2_median": found.median().item()}


def robustness_curve(samples: dict[str, torch.Tensor], points: int = 50) -> tuple[list[float], list[float]]:
    """Accuracy against an L2 budget, from one minimal-perturbation run without re-running: at
    radius r an image counts as correct if it is correct when clean and the attack found no
    adversarial within r. Radii from 0 to the largest successful L2, `points` of them (the one
    radius 0 when no adversarial has a positive L2)."""
    found = samples["l2"][samples["success"]]
    top = found.max().item() if len(found) else 0.0
    radii = torch.linspace(0.0, top, points) if top > 0 else torch.zeros(1)
    fooled_within = samples["success"][None, :] & (samples["l2"][None, :] <= radii[:, None])
    accuracy = (samples["clean_correct"][None, :] & ~fooled_within).float().mean(1)
    return radii.tolist(), accuracy.tolist()


def component_summary(
    broken_by: torch.Tensor, component_seconds: torch.Tensor, names: list[str], attack_seconds: float
) -> dict[str, list]:
    """An ensemble's breakdown (AutoAttack): per component, the images it broke, the robust
    accuracy once it has run, and the wall-clock seconds spent in it (its share of the per-image
    time the ensemble recorded, times the attack's wall time — slices run in parallel).
    `broken_by` holds a component index per image, or a negative value (robust, misclassified)."""
    n = len(broken_by)
    robust = int((broken_by != -2).sum())  # -2: misclassified before any attack
    broken, accuracy = [], []
    for i in range(len(names)):
        count = int((broken_by == i).sum())
        robust -= count
        broken.append(count)
        accuracy.append(robust / n if n else float("nan"))
    spent = component_seconds.sum(0)
    share = spent / spent.sum() if spent.sum() > 0 else spent
    return {
        "component": list(names),
        "broken": broken,
        "robust_accuracy_after": accuracy,
        "seconds": (share * attack_seconds).tolist(),
    }
