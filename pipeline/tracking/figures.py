"""Figures: the per-run grid of examples and the per-sweep summary plots (matplotlib, no display)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _image(ax, img: torch.Tensor, **kwargs) -> None:
    """Show a (C, H, W) tensor; one channel as a grey or diverging map, three as RGB."""
    array = img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)
    ax.imshow(array.numpy(), **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(
    examples: Mapping[str, torch.Tensor],
    title: str,
    columns: int = 4,
    class_names: Sequence[str] | None = None,
    label_word: str = "true",
) -> Figure:
    """Triplets original | perturbation (scaled to its own max) | adversarial, captioned with the
    label (`label_word`: "true", or "ref" for a reference label taken from the model),
    predictions and confidences; red captions mark successful attacks."""
    name = (lambda c: class_names[c]) if class_names else str
    n = len(examples["y"])
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, 3 * columns, figsize=(3 * columns * 1.25, rows * 1.8 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        row, col = divmod(i, columns)
        ax_x, ax_d, ax_a = axes[row, 3 * col : 3 * col + 3]
        x, x_adv = examples["x"][i], examples["x_adv"][i]
        delta = x_adv - x
        scale = float(delta.abs().max()) or 1.0
        grey = {"cmap": "gray", "vmin": 0, "vmax": 1}
        _image(ax_x, x, **grey)
        if delta.shape[0] == 1:
            _image(ax_d, delta, cmap="RdBu_r", vmin=-scale, vmax=scale)
        else:
            _image(ax_d, (delta / (2 * scale) + 0.5).clamp(0, 1))
        _image(ax_a, x_adv, **grey)
        for ax in (ax_x, ax_d, ax_a):
            ax.axis("on")
        y, clean, adv = int(examples["y"][i]), int(examples["clean_pred"][i]), int(examples["adv_pred"][i])
        ax_x.set_title(
            f"{label_word} {name(y)}\npred {name(clean)} {examples['clean_confidence'][i]:.0%}", fontsize=7
        )
        ax_d.set_title(f"perturbation\n±{scale:.3g}", fontsize=7)
        target = f" → {name(int(examples['target'][i]))}" if "target" in examples else ""
        ax_a.set_title(
            f"adv{target}\npred {name(adv)} {examples['adv_confidence'][i]:.0%}",
            fontsize=7,
            color="red" if bool(examples["success"][i]) else "black",
        )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def metric_curves(x_label: str, series: Mapping[str, Mapping[str, tuple[list, list]]], title: str) -> Figure:
    """One panel per metric; in each, one line per series label: {metric: {label: (xs, ys)}}."""
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.6), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], series.items(), strict=True):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label or None)
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if any(lines):
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def min_norm_figure(
    norms: Sequence[float], radii: Sequence[float], accuracy: Sequence[float], title: str
) -> Figure:
    """A minimal-perturbation attack's result: the histogram of the per-image minimal L2 of its
    successful adversarials, and the accuracy-vs-L2-budget curve that follows from them."""
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_h.hist(list(norms), bins=40, color="tab:blue")
    if len(norms):
        median = float(torch.tensor(list(norms)).median())
        ax_h.axvline(median, color="black", linestyle="--", label=f"median {median:.3g}")
        ax_h.legend(fontsize=7)
    ax_h.set_xlabel("minimal L2 of a successful adversarial")
    ax_h.set_ylabel("images")
    ax_c.plot(list(radii), list(accuracy), color="tab:red")
    ax_c.set_xlabel("L2 budget")
    ax_c.set_ylabel("accuracy")
    ax_c.set_ylim(0, 1)
    for ax in (ax_h, ax_c):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def component_bars(summary: Mapping[str, Sequence], title: str) -> Figure:
    """An ensemble's components side by side: the images each broke (left) and the seconds spent
    in each (right), labelled with the robust accuracy once it had run."""
    names = list(summary["component"])
    fig, (ax_b, ax_s) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = ax_b.bar(names, list(summary["broken"]), color="tab:red")
    for bar, accuracy in zip(bars, summary["robust_accuracy_after"], strict=True):
        ax_b.annotate(
            f"robust {accuracy:.2%}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax_b.set_ylabel("images broken (first to break them)")
    ax_b.margins(y=0.15)  # room for the labels
    ax_s.bar(names, list(summary["seconds"]), color="tab:blue")
    ax_s.set_ylabel("seconds")
    for ax in (ax_b, ax_s):
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
