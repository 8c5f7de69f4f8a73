"""`python -m pipeline.papers.published` (or `make published`): published MNIST numbers beside ours.

Attacks the default CNN (the cached checkpoint; trained if missing) the way two papers measured
their attacks on MNIST and prints their numbers next to ours:

- Carlini & Wagner 2017, Table IV: mean L2 of C&W L2 and mean L∞ of iterative FGSM (our `bim`),
  targeted, per image the best / average / worst of the 9 other classes; DeepFool's mean L2.
- Moosavi-Dezfooli et al. 2016 (DeepFool), Table 1, LeNet: rho_adv = mean ||r||2 / ||x||2 of
  DeepFool, FGSM (at the smallest eps that fools each image) and L-BFGS.

Each measurement uses the first `n` MNIST test images the model classifies correctly, and its
attack's hyper-parameters as conf/attack/<name>.yaml sets them, with the deviations and the keys of
its own that conf/published.yaml states (each section of it composes an attack config). The table
goes to stdout, to outputs/published/<date>_<time>.{md,json} and to a run of the MLflow
experiment `published`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import cast

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.attacks import bim, cw_l2, deepfool, fgsm, lbfgs
from pipeline.attacks.projection import per_image
from pipeline.attacks.targets import next_class
from pipeline.cli import entrypoint, exit_on_user_error
from pipeline.config import CONFIG_DIR, attack_kwargs, build, flatten, is_pretrained, validate
from pipeline.errors import ConfigError
from pipeline.metrics import l2, linf
from pipeline.models import load_classifier
from pipeline.models.training import checkpoint_for
from pipeline.parallel import CoreSplit, cpu_workers, split_or_call
from pipeline.tracking.store import Tracker, provenance_tags

SECTIONS = ("cw", "deepfool", "lbfgs", "fgsm", "bim")
CW_2017 = "C&W 2017, Table IV"
DEEPFOOL_2016 = "DeepFool 2016, Table 1 (LeNet)"
# (paper, attack, quantity, published value(s), our section, our keys), as published
ROWS = [
    (
        CW_2017,
        "C&W L2, targeted",
        "mean L2, best / average / worst target",
        (1.36, 1.76, 2.60),
        "cw",
        ("l2_best", "l2_average", "l2_worst"),
    ),
    (CW_2017, "DeepFool, untargeted", "mean L2", (2.11,), "deepfool", ("l2_mean",)),
    (
        CW_2017,
        "iterative FGSM (`bim`), targeted",
        "mean L∞, best / average / worst target",
        (0.14, 0.19, 0.26),
        "bim",
        ("linf_best", "linf_average", "linf_worst"),
    ),
    (DEEPFOOL_2016, "DeepFool", "rho_adv", (0.20,), "deepfool", ("rho_adv",)),
    (DEEPFOOL_2016, "FGSM, smallest fooling eps", "rho_adv", (1.0,), "fgsm", ("rho_adv",)),
    (DEEPFOOL_2016, "L-BFGS", "rho_adv", (0.25,), "lbfgs", ("rho_adv",)),
]
CHUNK = 256  # images per call where an attack holds many candidates per image (fgsm's eps grid)
# each section's settings: these keys of its own (or run keys it reads), and its attack's
# hyper-parameters (conf/attack/<name>.yaml with conf/published.yaml's deviations) but those the
# measurement sets itself (bim's step size: alpha_scale·eps/steps at every eps tried)
OWN_KEYS = {
    "cw": ("n",),
    "deepfool": ("n",),
    "lbfgs": ("n", "targeted"),
    "fgsm": ("n", "eps_step", "eps_max"),
    "bim": ("n", "alpha_scale", "bisection_steps", "eps_max"),
}
SET_HERE = {"bim": ("alpha",)}


# ---------------------------------------------------------------- helpers


def _hyper(s: dict, section: str) -> dict:
    """The attack hyper-parameters among a section's settings (all but its OWN_KEYS)."""
    return {key: value for key, value in s.items() if key not in OWN_KEYS[section]}


def predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    with torch.no_grad():
        return torch.cat([model(part).argmax(1) for part in x.split(batch)])


def _mean(values: torch.Tensor) -> float:
    return values.float().mean().item() if len(values) else float("nan")


def _all_targets(x: torch.Tensor, y: torch.Tensor, num_classes: int):
    """Every image once per other class, image-major: (x, y, target) with n·(C−1) rows."""
    k = num_classes - 1
    offsets = torch.arange(1, num_classes, device=y.device).repeat(len(y))
    y_rep = y.repeat_interleave(k)
    return x.repeat_interleave(k, 0), y_rep, (y_rep + offsets) % num_classes


def over_targets(distance: torch.Tensor, success: torch.Tensor, n: int, prefix: str) -> dict:
    """Best / average / worst case over the targets of each image (distance, success: n·k rows,
    image-major): per image the smallest, mean and largest distance over its targets, averaged
    over the images whose every target succeeded. `success_rate` is over image-target pairs."""
    d, ok = distance.view(n, -1), success.view(n, -1)
    complete = ok.all(1)
    done = d[complete]
    return {
        "success_rate": _mean(ok.flatten()),
        "complete_images": int(complete.sum()),
        f"{prefix}_best": _mean(done.amin(1)),
        f"{prefix}_average": _mean(done.mean(1)),
        f"{prefix}_worst": _mean(done.amax(1)),
    }


def _untargeted(x: torch.Tensor, adv: torch.Tensor, success: torch.Tensor) -> dict:
    """Mean L2 and rho_adv = mean ||r||2/||x||2 over the successful images."""
    r = l2(adv - x)
    return {
        "success_rate": _mean(success),
        "l2_mean": _mean(r[success]),
        "rho_adv": _mean((r / l2(x))[success]),
    }


# ---------------------------------------------------------------- the measurements


def measure_cw(model, x, y, s: dict, split, num_classes: int = 10) -> dict:
    """C&W L2 towards each of the other classes."""
    xs, ys, targets = _all_targets(x, y, num_classes)

    def attack(a, b, t):
        return cw_l2(model, a, b, targeted=True, target=t, **_hyper(s, "cw"))

    adv = split_or_call(split, attack, xs, ys, targets)
    return over_targets(l2(adv - xs), predict(model, adv) == targets, len(x), "l2")


def measure_deepfool(model, x, y, s: dict, split) -> dict:
    def attack(a, b):
        return deepfool(model, a, b, **_hyper(s, "deepfool"))

    adv = split_or_call(split, attack, x, y)
    return _untargeted(x, adv, predict(model, adv) != y)


def measure_lbfgs(model, x, y, s: dict, split, num_classes: int = 10) -> dict:
    targeted = bool(s["targeted"])
    target = next_class(y, num_classes) if targeted else None

    def attack(a, b, t):
        return lbfgs(model, a, b, target=t, targeted=targeted, **_hyper(s, "lbfgs"))

    adv = split_or_call(split, attack, x, y, target)
    pred = predict(model, adv)
    # targeted implies a `target` (set above)
    return _untargeted(x, adv, pred == cast(torch.Tensor, target) if targeted else pred != y)


def eps_grid(s: dict) -> list[float]:
    steps = round(s["eps_max"] / s["eps_step"])
    return [round(s["eps_step"] * i, 10) for i in range(1, steps + 1)]


def fgsm_smallest(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grid: list[float]):
    """Per image, FGSM at the smallest eps of `grid` (ascending) that fools the model, from one
    gradient: (adversarials, that eps); x and NaN where none does."""
    best, eps = x.clone(), torch.full((len(x),), float("nan"), device=x.device)
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for value, adv in zip(grid, fgsm(model, x, y, eps=grid), strict=True):
        new = (predict(model, adv) != y) & ~found
        best[new], eps[new] = adv[new], value
        found |= new
    return best, eps


def measure_fgsm(model, x, y, s: dict, split) -> dict:
    grid = eps_grid(s)
    parts = [
        split_or_call(split, lambda a, b: fgsm_smallest(model, a, b, grid), xc, yc)
        for xc, yc in zip(x.split(CHUNK), y.split(CHUNK), strict=True)
    ]
    adv, eps = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    found = ~eps.isnan()
    return {**_untargeted(x, adv, found), "eps_mean": _mean(eps[found])}


def bim_smallest(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, s: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the smallest L∞ of a successful targeted BIM adversarial found while bisecting
    its eps: eps_max first, then `bisection_steps` halvings of the bracket. (L∞ distance, success)."""
    n = len(x)
    low = torch.zeros(n, device=x.device)
    high = torch.full((n,), float(s["eps_max"]), device=x.device)
    distance = torch.full((n,), float("inf"), device=x.device)
    for step in range(s["bisection_steps"] + 1):
        eps = high if step == 0 else (low + high) / 2
        radius = per_image(eps, x)  # one L∞ radius per image
        adv = bim(
            model,
            x,
            y,
            eps=radius,
            alpha=s["alpha_scale"] * radius / s["steps"],
            steps=s["steps"],
            targeted=True,
            target=target,
        )
        ok = predict(model, adv) == target
        distance = torch.where(ok, torch.minimum(distance, linf(adv - x)), distance)
        if step == 0:
            low = torch.where(ok, low, high)  # not found at eps_max: the bracket closes there
        else:
            high, low = torch.where(ok, eps, high), torch.where(ok, low, eps)
    return distance, distance.isfinite()


def measure_bim(model, x, y, s: dict, split, num_classes: int = 10) -> dict:
    xs, ys, targets = _all_targets(x, y, num_classes)
    distance, success = split_or_call(split, lambda a, b, t: bim_smallest(model, a, b, t, s), xs, ys, targets)
    return over_targets(distance, success, len(x), "linf")


MEASURE = {
    "cw": measure_cw,
    "deepfool": measure_deepfool,
    "lbfgs": measure_lbfgs,
    "fgsm": measure_fgsm,
    "bim": measure_bim,
}


def measure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: dict,
    split: CoreSplit | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Every section of `settings` with n > 0 on the first n of (x, y) that the model gets
    right: {section: {numbers..., "n", "images", "seconds"}}; a skipped section is absent."""
    correct = predict(model, x) == y
    results = {}
    for name in SECTIONS:
        s = settings[name]
        if s["n"] == 0:
            continue
        keep = correct[: s["n"]]
        xs, ys = x[: s["n"]][keep], y[: s["n"]][keep]
        if len(xs) == 0:  # its row reads "not measured"
            log(f"{name}: the model gets none of the first {s['n']} test images right; skipped")
            continue
        start = time.perf_counter()
        numbers = MEASURE[name](model, xs, ys, s, split)
        seconds = time.perf_counter() - start
        results[name] = {**numbers, "n": s["n"], "images": len(xs), "seconds": seconds}
        log(
            f"{name}: {len(xs)} images in {seconds:.1f} s: "
            + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items())
        )
    return results


# ---------------------------------------------------------------- the report


def _fmt(values) -> str:
    return " / ".join(f"{v:.2f}" if v >= 0.1 else f"{v:.3f}" for v in values)


def table(results: dict) -> str:
    lines = [
        "| paper | attack | quantity | published | ours | success (ours) | images (ours) | time (ours) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for paper, attack, quantity, published, section, keys in ROWS:
        ours = results.get(section)
        if ours is None:
            lines.append(
                f"| {paper} | {attack} | {quantity} | {_fmt(published)} | not measured | – | – | – |"
            )
            continue
        values = " / ".join(f"{ours[k]:.3f}" for k in keys)
        images = f"{ours['images']} of first {ours['n']}"
        if "complete_images" in ours:
            images += f" ({ours['complete_images']} with all 9 targets)"
        lines.append(
            f"| {paper} | {attack} | {quantity} | {_fmt(published)} | {values} | "
            f"{ours['success_rate']:.1%} | {images} | {ours['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def settings_text(settings: dict) -> str:
    """What each measurement ran with, one line each."""
    cw, df, lb, fg, bi = (settings[k] for k in SECTIONS)
    grid = eps_grid(fg)
    return "\n".join(
        [
            f"- C&W L2: Adam lr {cw['lr']:g}, {cw['steps']} steps (the paper: 10,000) for each of "
            f"{cw['binary_steps']} values of c from {cw['c_init']:g}, confidence {cw['confidence']:g}, "
            f"abort early {'on' if cw['abort_early'] else 'off'}; best / average / worst = per image the "
            "smallest / mean / largest L2 over the 9 targets, averaged over the images whose 9 targets "
            "all succeeded; success over image-target pairs.",
            f"- DeepFool: at most {df['steps']} steps, overshoot {df['overshoot']:g}, the top "
            f"{df['candidates']} classes as candidates; L2 and rho_adv over the fooled images.",
            f"- L-BFGS (`lbfgs`): {'targeted at the next class' if lb['targeted'] else 'untargeted'}, "
            f"{lb['c_steps']} values of c from {lb['c_init']:g}, at most {lb['max_iter']} L-BFGS "
            f"iterations each (history {lb['history']}, ftol {lb['ftol']:g}).",
            f"- FGSM: eps grid {grid[0]:g}, {grid[1] if len(grid) > 1 else grid[0]:g}, …, {grid[-1]:g} "
            "(one gradient per image); per image the perturbation (clipped to [0,1]) at the smallest "
            "eps that fools it.",
            f"- iterative FGSM (`bim`): {bi['steps']} steps of {bi['alpha_scale']:g}·eps/{bi['steps']} "
            f"at each eps; eps bisected per image and target ({bi['eps_max']:g}, then "
            f"{bi['bisection_steps']} halvings: resolution "
            f"{bi['eps_max'] / 2 ** bi['bisection_steps']:.4f}); "
            "distance = L∞ of the closest successful adversarial; best / average / worst as for C&W.",
            "- rho_adv = mean ||r||2 / ||x||2 with images in [0,1]; every measurement uses the first n "
            "test images the model classifies correctly.",
        ]
    )


def note(model_name: str, info: dict, commit: str) -> str:
    accuracy = info.get("test_accuracy")
    acc = f"test accuracy {accuracy:.2%}" if accuracy is not None else "user-supplied checkpoint"
    epochs = info.get("config", {}).get("train", {}).get("epochs")
    trained = f", Adam, {epochs} epochs" if epochs else ""
    ours = (
        f"our default CNN (2 conv + 1 dense layer{trained})"
        if model_name == "cnn"
        else f"our `{model_name}` model"
    )
    return (
        f"Published MNIST numbers beside this pipeline's (model `{model_name}`, {acc}, commit "
        f"{commit[:10]}). The models differ: the papers attacked their own networks (C&W their "
        f"MNIST CNN, DeepFool a LeNet), we attack {ours}, and our attack settings are cut to "
        "run in minutes on a CPU — compare magnitudes and orderings, not the digits."
    )


def report_text(results: dict, settings: dict, model_name: str, info: dict, commit: str) -> str:
    return f"{note(model_name, info, commit)}\n\n{table(results)}\n\nSettings:\n{settings_text(settings)}\n"


# ---------------------------------------------------------------- the command


def _settings(cfg: DictConfig, test_size: int) -> dict:
    """{section: its settings}: the keys of OWN_KEYS, then its attack's hyper-parameters."""
    settings = {}
    for name in SECTIONS:
        section = cfg[name]
        n = section.n
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= test_size:
            raise ConfigError(f"{name}.n={n!r} must be an integer from 0 (skip) to {test_size}")
        hyper = attack_kwargs(section, where=name, other_keys=OWN_KEYS[name])
        settings[name] = {
            **{key: section[key] for key in OWN_KEYS[name]},
            **{key: v for key, v in hyper.items() if key not in SET_HERE.get(name, ())},
        }
    return settings


def produce(cfg: DictConfig) -> dict:
    """Measure, print, save and log; returns the report (results, text, paths, MLflow run id)."""
    validate(cfg)
    if is_pretrained(cfg):
        raise ConfigError(
            "the published numbers are for MNIST; use data=mnist with an MNIST model (cnn, mlp, fc*)"
        )
    data = build(cfg.data.module)
    settings = _settings(cfg, data.test_size)
    tracker = Tracker.connect(cfg.tracking)
    data.prepare_data()
    checkpoint = checkpoint_for(cfg, data, tracker)
    model = load_classifier(checkpoint.path).requires_grad_(False)
    data.setup()
    first = max(s["n"] for s in settings.values())
    x, y = (t[:first] for t in data.test_set.tensors)
    workers = cpu_workers(cfg.cpu_workers)
    start = time.perf_counter()
    with ExitStack() as stack:
        split = stack.enter_context(CoreSplit(workers)) if workers > 1 else None
        results = measure(model, x, y, settings, split)
    seconds = time.perf_counter() - start
    commit = provenance_tags()["git_commit"]
    text = report_text(results, settings, cfg.model.name, checkpoint.info, commit)

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(cfg.paths.outputs) / "published"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": stamp,
        "commit": commit,
        "model": cfg.model.name,
        "checkpoint": str(checkpoint.path),
        "test_accuracy": checkpoint.info.get("test_accuracy"),
        "cpu_workers": workers,
        "seconds": seconds,
        "settings": settings,
        "results": results,
        "published": [
            {"paper": r[0], "attack": r[1], "quantity": r[2], "values": r[3], "ours": r[4], "keys": r[5]}
            for r in ROWS
        ],
    }
    md, js = out / f"{stamp}.md", out / f"{stamp}.json"
    md.write_text(text)
    js.write_text(json.dumps(record, indent=2))

    tags = {"stage": "published", **checkpoint.tags()}
    params = {"model.name": cfg.model.name, "cpu_workers": workers, **flatten(settings)}
    metrics = {
        f"{name}.{key}": value
        for name, numbers in results.items()
        for key, value in numbers.items()
        if math.isfinite(value)
    }
    with tracker.run(cfg.tracking.experiment, f"published {cfg.model.name}", params, tags) as run_id:
        tracker.log_metrics(run_id, {**metrics, "seconds": seconds})
        tracker.log_text(run_id, text, "published.md")
        tracker.log_dict(run_id, record, "published.json")
    print(f"\n{text}")
    print(
        f"written: {md} and {js}; MLflow run {run_id} (experiment "
        f"'{cfg.tracking.experiment}', {tracker.uri}); {seconds:.0f} s of attacks"
    )
    return {**record, "text": text, "paths": [md, js], "run_id": run_id}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="published")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    produce(cfg)


if __name__ == "__main__":
    entrypoint(main)
