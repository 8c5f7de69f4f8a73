"""`python -m pipeline.papers.robust` (or `make robust`): adversarially trained MNIST models, ours
beside the published ones, at L∞ eps = 0.3.

Trains each recipe of `recipes` (conf/robust.yaml: a recipe is a list of pipeline overrides such as
`[train=adversarial, model=madry_cnn]`, composed over conf/config.yaml with Hydra's compose API)
through the checkpoint cache, then measures every model on the first `n` MNIST test images: clean
accuracy and the accuracy under FGSM, PGD-40, PGD-50 × 10 restarts (Wong et al.'s evaluation) and
PGD-100 × R restarts (Madry et al.'s, who use 50). An image counts as robust when the model
classifies it correctly clean and after every restart; each restart runs only on the images no
earlier restart has fooled (the same accuracy as running every restart on every image, as each
image's adversarial depends only on its own seed). The table puts Madry et al. 2018, Wong, Rice &
Kolter 2020 (fast FGSM) and TRADES (Zhang et al. 2019) beside ours, with epochs and training time,
and goes to stdout, to outputs/robust/<date>_<time>.{md,json} and to a run of the MLflow experiment
`robust`.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from pipeline.cli import entrypoint, exit_on_user_error
from pipeline.config import (
    CONFIG_DIR,
    attack_function,
    attack_kwargs,
    build,
    flatten,
    is_pretrained,
    validate,
)
from pipeline.errors import ConfigError, user_message
from pipeline.models import load_classifier
from pipeline.models.fast import attacked_model
from pipeline.models.training import Checkpoint, checkpoint_for
from pipeline.papers.published import predict
from pipeline.parallel import CoreSplit, cpu_workers, split_or_call
from pipeline.tracking.store import Tracker, provenance_tags

ATTACKS = ("fgsm", "pgd40", "pgd50", "pgd100", "autoattack")  # conf/robust.yaml's sections, in order
ROWS = ("clean", *ATTACKS)
# this command's settings that every recipe takes as they are (a recipe may not override them)
SHARED = ("seed", "paths", "trainer", "cpu_workers", "fast_cpu_model", "tracking")
# what a recipe sets, not the command line: overriding them for `make robust` itself would change nothing
RECIPE_KEYS = ("train", "model", "data", "attack", "checkpoint", "n_eval")
PAPER_EPS = 0.3  # every paper below trained and evaluated at this radius


@dataclass(frozen=True)
class Paper:
    """A published adversarially trained MNIST model, as REFERENCE.md quotes it."""

    name: str
    source: str
    model: str
    training: str
    epochs: str
    accuracy: dict[str, str]  # row → as published, with a note where its attack differs from ours
    train_time: str = "—"  # none of the three papers states one for MNIST


# keyed by train.method: the recipe of ours that each is compared with
PAPERS = {
    "pgd": Paper(
        "Madry et al. 2018",
        "MadryLab/mnist_challenge",
        "conv 5×5×32 → pool → conv 5×5×64 → pool → FC1024 (`madry_cnn`)",
        "PGD-40, step 0.01, random start; Adam 1e-4, batch 50",
        "~83 (100,000 steps)",
        {
            "clean": "98.53%",
            "pgd40": "93.2% (paper)",
            "pgd100": "89.62% (× 50 restarts)",
            "autoattack": "88.50%",
        },
    ),
    "fgsm_rs": Paper(
        "Wong et al. 2020 (fast FGSM)",
        "locuslab/fast_adversarial",
        "conv(1→16, k4, s2) → conv(16→32, k4, s2) → FC100",
        "FGSM from a uniform start, α 0.375; Adam, cyclic lr ≤ 5e-3, batch 100",
        "10",
        {"clean": "98.50%", "pgd50": "88.77%", "autoattack": "82.93%"},
    ),
    "trades": Paper(
        "TRADES (Zhang et al. 2019)",
        "yaodongyu/TRADES",
        "SmallCNN: conv 32,32,64,64 (3×3) → FC200 → FC200, dropout 0.5",
        "TRADES β 6, inner PGD-40 of 0.01; SGD lr 0.01, momentum 0.9, batch 128",
        "100",
        {"clean": "99.48%", "pgd40": "96.07%", "autoattack": "92.81%"},
    ),
}


# ---------------------------------------------------------------- recipes


def _strings(value: Any, where: str) -> list[str]:
    """A config value that should be a list of strings (a lone string is a list of one)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, ListConfig | list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}={value!r} must be a list of strings in brackets")
    return list(value)


def selected(cfg: DictConfig) -> list[str]:
    """The names in `recipes`, each defined under `recipe_overrides`, in order, once each."""
    names = list(dict.fromkeys(_strings(cfg.recipes, "recipes")))
    known = list(cfg.recipe_overrides)
    if not names:
        raise ConfigError(f"recipes=[] selects nothing; pick from {', '.join(map(str, known))}")
    for name in names:
        if name not in cfg.recipe_overrides:
            raise ConfigError(
                f"recipes: unknown recipe {name!r}; choose from {', '.join(map(str, known))} "
                "or define it under recipe_overrides in conf/robust.yaml"
            )
    return names


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml composed with `overrides`, as Hydra composes a job's config (inside a
    `@hydra.main` app through its own initialisation, elsewhere through a temporary one)."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def overrides_of(cfg: DictConfig, name: str) -> list[str]:
    """Recipe `name`'s overrides, then `every_recipe`."""
    return [
        *_strings(cfg.recipe_overrides[name], f"recipe_overrides.{name}"),
        *_strings(cfg.every_recipe, "every_recipe"),
    ]


def recipe_config(cfg: DictConfig, name: str) -> DictConfig:
    """The pipeline config of recipe `name`: its overrides and `every_recipe` composed over
    conf/config.yaml, with this command's SHARED settings."""
    overrides = overrides_of(cfg, name)
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] in SHARED:
            raise ConfigError(
                f"recipe {name}: {override!r} sets one of {', '.join(SHARED)}, which every recipe "
                f"takes from this command: pass it as `{override}` to make robust (ROBUST=...)"
            )
    try:
        composed = compose_config(overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"recipe {name} ({' '.join(overrides)}): {user_message(error)}") from None
    for key in SHARED:
        value = cfg[key]
        composed[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    try:
        validate(composed)
    except ConfigError as error:
        raise ConfigError(f"recipe {name}: {error}") from None
    if is_pretrained(composed) or composed.data.name != "mnist":
        raise ConfigError(f"recipe {name}: the published numbers are for MNIST models trained here")
    return composed


def check_command_line() -> None:
    """Overrides of the recipes' own keys on this command's line would change nothing: say where
    they go instead."""
    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] in RECIPE_KEYS:
            raise ConfigError(
                f"{override!r} changes nothing here: each recipe sets its own training and model; "
                f"pass 'every_recipe=[\"{override}\"]' (all recipes) or edit recipe_overrides in "
                "conf/robust.yaml"
            )


# ---------------------------------------------------------------- the attacks


def settings_of(cfg: DictConfig, test_size: int) -> dict:
    """{"n": ..., attack: {"function", "eps", "batch_size", "restarts", hyper-parameters...}}."""
    n = cfg.n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= test_size:
        raise ConfigError(f"n={n!r} must be an integer from 1 to {test_size} (the test images used)")
    settings: dict[str, Any] = {"n": n}
    for name in ATTACKS:
        section = cfg[name]
        hyper = attack_kwargs(section, where=name, other_keys=("n",))
        eps = section.eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 <= eps <= 1:
            raise ConfigError(f"{name}.eps={eps!r} must be an L∞ radius in [0, 1], e.g. eps=0.3")
        restarts = hyper.pop("restarts", 1)
        for key, value in (("restarts", restarts), ("batch_size", section.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}.{key}={value!r} must be a positive integer")
        n_attack = section.get("n", n)
        if isinstance(n_attack, bool) or not isinstance(n_attack, int) or not 1 <= n_attack:
            raise ConfigError(f"{name}.n={n_attack!r} must be a positive integer (images attacked)")
        settings[name] = {
            "n": min(n_attack, n),
            "function": section.function,
            "eps": float(eps),
            "restarts": restarts,
            "batch_size": section.batch_size,
            **hyper,
        }
    return settings


Attack = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, y, seeds) → x_adv


def bind(model: nn.Module, s: dict) -> Attack:
    """One restart of the attack `s` describes: (x, y, seeds) → adversarials (`seeds`, one per
    image, seed the random start of an attack that takes them)."""
    function = attack_function(s)
    hyper = {k: v for k, v in s.items() if k not in ("n", "function", "eps", "restarts", "batch_size")}
    parameters = inspect.signature(function).parameters
    if "restarts" in parameters:
        hyper["restarts"] = 1

    def attack(x: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        extra = {"seeds": seeds} if "seeds" in parameters else {}
        return function(model, x, y, s["eps"], **hyper, **extra)

    return attack


def surviving(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    restarts: int,
    *,
    seeds: torch.Tensor,
    stride: int,
    split: CoreSplit | None = None,
    batch: int = 512,
    log: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Which images stay classified correctly through `restarts` runs of `attack`: (robust (n,)
    bool, the accuracy after each restart). Images the model gets wrong clean are not attacked
    (never robust); restart r runs only on the images no earlier restart has fooled, with seeds
    `seeds + r·stride` (`seeds`: one int per image, e.g. its test-set index; `stride` > every seed)
    — the accuracy of running every restart on every image, at a fraction of the cost."""
    robust = predict(model, x) == y
    accuracy = []
    for restart in range(restarts):
        left = robust.nonzero().flatten()
        for part in left.split(batch):
            xs, ys = x[part], y[part]
            adv = split_or_call(split, attack, xs, ys, seeds[part] + restart * stride)
            robust[part] = predict(model, adv) == ys
        accuracy.append(robust.float().mean().item())
        if log is not None:
            log(restart, robust)
    return robust, accuracy


def _label(name: str, s: dict) -> str:
    if name == "clean":
        return "clean"
    if name == "autoattack":
        return f"AutoAttack ({s['version']}, first {s['n']:,} images)"
    if s["function"] == "pipeline.attacks.fgsm":
        return "FGSM"
    if s["function"] != "pipeline.attacks.pgd":
        return f"{s['function'].rpartition('.')[2]} ({name})"
    restarts = f" × {s['restarts']} restarts" if s["restarts"] > 1 else ""
    step = f"{s['alpha']:g}" if s.get("alpha") is not None else f"2.5·eps/{s['steps']}"
    start = "" if s.get("random_start", True) else ", no random start"
    return f"PGD-{s['steps']}{restarts}, step {step}{start}"


def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: dict,
    split: CoreSplit | None = None,
    stride: int = 10_000,
    log: Callable[[str], None] = print,
) -> dict:
    """Clean accuracy and the accuracy under every attack of `settings` on (x, y), the first
    images of the test set (their index seeds each image's random starts): {row: {"accuracy",
    "seconds", and for attacks "per_restart"}}."""
    start = time.perf_counter()
    results: dict[str, dict] = {
        "clean": {
            "accuracy": (predict(model, x) == y).float().mean().item(),
            "seconds": time.perf_counter() - start,
        }
    }
    seeds = torch.arange(len(x), device=x.device)
    for name in ATTACKS:
        s, label = settings[name], _label(name, settings[name])
        start = time.perf_counter()

        def progress(restart: int, robust: torch.Tensor, s=s, label=label, start=start) -> None:
            if s["restarts"] > 1:
                log(
                    f"  {label}: restart {restart + 1}/{s['restarts']}: accuracy "
                    f"{robust.float().mean().item():.2%} ({time.perf_counter() - start:.0f} s)"
                )

        m = s["n"]  # an expensive attack may run on the first images only
        _, per_restart = surviving(
            model,
            x[:m],
            y[:m],
            bind(model, s),
            s["restarts"],
            seeds=seeds[:m],
            stride=stride,
            split=split,
            batch=s["batch_size"],
            log=progress,
        )
        seconds = time.perf_counter() - start
        results[name] = {"accuracy": per_restart[-1], "per_restart": per_restart, "seconds": seconds}
        log(f"  {label}: accuracy {per_restart[-1]:.2%} in {seconds:.1f} s")
    return results


# ---------------------------------------------------------------- the report


def paper_for(train: DictConfig | dict, eps: float) -> Paper | None:
    """The published model a recipe is compared with: same method, radius 0.3 in training and here."""
    if eps != PAPER_EPS or train.get("eps") != PAPER_EPS:
        return None
    return PAPERS.get(str(train.get("method")))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _ours(row: str, recipe: dict) -> str:
    card, results = recipe["card"], recipe["results"]
    if row == "model":
        return f"`{recipe['model']}`"
    if row == "training":
        return str(card.get("recipe", "—"))
    if row == "epochs":
        kept = f" (kept {card['best_epoch'] + 1})" if card.get("best_epoch") is not None else ""
        return f"{card.get('epochs_run', '—')}{kept}"
    if row == "training time":
        return _duration(card.get("train_seconds"))
    if row in results:
        return f"{results[row]['accuracy']:.2%}"
    return "—"


def _theirs(row: str, paper: Paper) -> str:
    fields = {"model": paper.model, "training": paper.training, "epochs": paper.epochs}
    if row in fields:
        return fields[row]
    if row == "training time":
        return paper.train_time
    return paper.accuracy.get(row, "—")


def table(recipes: dict, settings: dict) -> str:
    """Rows: the models, their training, then an accuracy row per attack; columns: each recipe of
    ours, then every published model."""
    columns: list[tuple[str, Callable[[str], str]]] = [
        (f"{name} (ours)", functools.partial(_ours, recipe=recipe)) for name, recipe in recipes.items()
    ]
    columns += [(paper.name, functools.partial(_theirs, paper=paper)) for paper in PAPERS.values()]
    rows = [(row, row) for row in ("model", "training", "epochs", "training time")]
    rows += [(row, _label(row, settings.get(row, {}))) for row in ROWS]
    lines = [
        "| | " + " | ".join(header for header, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row, label in rows:
        lines.append(f"| {label} | " + " | ".join(cell(row) for _, cell in columns) + " |")
    return "\n".join(lines)


def notes(recipes: dict, settings: dict, eps: float) -> str:
    n = settings["n"]
    restarts = settings["pgd100"]["restarts"]
    lines = [
        f"- Ours: accuracy on the first {n:,} MNIST test images at L∞ eps {eps:g}. An image counts "
        "as robust when the model classifies it correctly clean and after every restart of the "
        "attack; each restart runs only on the images no earlier one has fooled. Random starts "
        "are seeded per image (test-set index + restart·10,000).",
        f"- AutoAttack: our `autoattack` ({settings['autoattack']['version']}: APGD-CE, APGD-T, FAB-T, "
        f"Square at the original's settings) on the first {settings['autoattack']['n']:,} images, "
        "each component only on the images every earlier one failed on.",
        f"- PGD-100: {restarts} restart(s) (Madry et al.'s leaderboard: 50; their paper: PGD-40 93.2%, "
        "PGD-100 × 20 restarts 89.3%)"
        + (
            ". Restarts only lower the accuracy: ours is an upper bound on the 50-restart number."
            if restarts < 50
            else "."
        ),
        "- The recipes differ from the papers' (models, epochs, inner attack steps: see the table and "
        "conf/robust.yaml); epochs and training time are ours as the model card recorded them "
        "(kept: the epoch whose weights were kept, the most robust on validation images).",
    ]
    lines.append(
        "- Published: "
        + "; ".join(f"{p.name}, {p.source}" for p in PAPERS.values())
        + " (— where a paper gives no number)."
    )
    for name, recipe in recipes.items():
        card = recipe["card"]
        test = card.get("test_accuracy")
        line = f"- `{name}` = `{' '.join(recipe['overrides'])}`: checkpoint {recipe['checkpoint_hash']}" + (
            f", test accuracy {test:.2%} (all 10,000)" if test is not None else ""
        )
        if recipe["paper"] is None:
            line += "; no published model to compare (another method, or eps ≠ 0.3)"
        if card.get("catastrophic_overfitting"):
            line += f"; catastrophic overfitting: {card['catastrophic_overfitting']}"
        lines.append(line + ".")
    return "\n".join(lines)


def settings_text(settings: dict) -> str:
    lines = []
    for name in ATTACKS:
        s = settings[name]
        hyper = ", ".join(
            f"{k} {v}" for k, v in s.items() if k not in ("function", "eps", "batch_size", "restarts")
        )
        lines.append(
            f"- {name}: {s['function']}, eps {s['eps']:g}, {s['restarts']} restart(s)"
            + (f", {hyper}" if hyper else "")
        )
    return "\n".join(lines)


def report_text(recipes: dict, settings: dict, eps: float, commit: str) -> str:
    head = (
        f"Adversarially trained MNIST models at L∞ eps {eps:g}, ours beside the published ones "
        f"(commit {commit[:10]})."
    )
    return (
        f"{head}\n\n{table(recipes, settings)}\n\n{notes(recipes, settings, eps)}\n\n"
        f"Attacks:\n{settings_text(settings)}\n"
    )


# ---------------------------------------------------------------- the command


def _card(checkpoint: Checkpoint) -> dict:
    """The model card without its config and per-epoch history (in the JSON through `recipe`)."""
    return {k: v for k, v in checkpoint.info.items() if k not in ("config",)}


def produce(cfg: DictConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or reuse), evaluate, print, save and log; returns the report (recipes and their
    results, text, paths, MLflow run id)."""
    names = selected(cfg)
    settings = settings_of(cfg, cfg.data.test_size)
    configs = {name: recipe_config(cfg, name) for name in names}
    tracker = Tracker.connect(cfg.tracking)

    checkpoints = {}
    for name, recipe_cfg in configs.items():
        data = build(recipe_cfg.data.module)
        data.prepare_data()
        log(f"{name}: {' '.join(overrides_of(cfg, name))}")
        checkpoints[name] = checkpoint_for(recipe_cfg, data, tracker)
    data.setup()
    images, labels = data.test_set.tensors
    stride = len(images)  # seeds: test-set index + restart·stride
    use_cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if use_cuda else "cpu")
    x, y = images[: settings["n"]].to(device), labels[: settings["n"]].to(device)
    workers = cpu_workers(cfg.cpu_workers)

    eps = float(cfg.eps)
    recipes: dict[str, dict] = {}
    start = time.perf_counter()
    with ExitStack() as stack:
        split = stack.enter_context(CoreSplit(workers)) if workers > 1 and device.type == "cpu" else None
        for name, checkpoint in checkpoints.items():
            log(f"{name}: attacking {len(x):,} test images ({checkpoint.path.name})")
            model = attacked_model(load_classifier(checkpoint.path).to(device), cfg.fast_cpu_model, device)
            recipes[name] = {
                "overrides": overrides_of(cfg, name),
                "model": configs[name].model.name,
                "checkpoint": str(checkpoint.path),
                "checkpoint_hash": checkpoint.hash,
                "card": _card(checkpoint),
                "paper": paper_for(configs[name].train, eps),
                "results": evaluate(model, x, y, settings, split, stride=stride, log=log),
            }
    seconds = time.perf_counter() - start
    commit = provenance_tags()["git_commit"]
    text = report_text(recipes, settings, eps, commit)

    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(cfg.paths.outputs) / "robust"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": stamp,
        "commit": commit,
        "eps": eps,
        "device": device.type,
        "cpu_workers": workers,
        "seconds": seconds,
        "settings": settings,
        "recipes": {
            name: {**r, "paper": r["paper"].name if r["paper"] else None} for name, r in recipes.items()
        },
        "published": [asdict(paper) for paper in PAPERS.values()],
    }
    md, js = out / f"{stamp}.md", out / f"{stamp}.json"
    md.write_text(text)
    js.write_text(json.dumps(record, indent=2))

    tags = {"stage": "robust", "recipes": ",".join(names)}
    for name, checkpoint in checkpoints.items():
        tags.update({f"{name}.{key}": value for key, value in checkpoint.tags().items()})
    params = {
        "recipes": ",".join(names),
        "eps": eps,
        "cpu_workers": workers,
        **{f"recipe.{name}": " ".join(r["overrides"]) for name, r in recipes.items()},
        **flatten(settings),
    }
    metrics: dict[str, float] = {"seconds": seconds}
    for name, r in recipes.items():
        for row, numbers in r["results"].items():
            metrics[f"{name}.{row}_accuracy"] = numbers["accuracy"]
            metrics[f"{name}.{row}_seconds"] = numbers["seconds"]
        for key in ("train_seconds", "epochs_run", "test_accuracy"):
            value = r["card"].get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                metrics[f"{name}.{key}"] = value
    with tracker.run(cfg.tracking.experiment, f"robust {','.join(names)}", params, tags) as run_id:
        tracker.log_metrics(run_id, metrics)
        for name, r in recipes.items():  # the accuracy after each restart, as a curve
            for attack in ATTACKS:
                for step, value in enumerate(r["results"][attack]["per_restart"], start=1):
                    tracker.log_metrics(run_id, {f"{name}.{attack}_accuracy_by_restart": value}, step)
        tracker.log_text(run_id, text, "robust.md")
        tracker.log_dict(run_id, record, "robust.json")
    print(f"\n{text}")
    print(
        f"written: {md} and {js}; MLflow run {run_id} (experiment '{cfg.tracking.experiment}', "
        f"{tracker.uri}); {seconds:.0f} s of attacks"
    )
    return {**record, "recipes": recipes, "text": text, "paths": [md, js], "run_id": run_id}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="robust")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    check_command_line()
    produce(cfg)


if __name__ == "__main__":
    entrypoint(main)
