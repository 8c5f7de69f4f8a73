"""`run(cfg)`: one job of the pipeline, top to bottom — data, train (cached), attack, track."""

from __future__ import annotations

import os
import time

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from pipeline.attack_step import AttackResult, run_attack
from pipeline.config import flatten, validate
from pipeline.models import load_classifier
from pipeline.tracking import PARENT_ENV, Tracker
from pipeline.train import Checkpoint, checkpoint_for
from pipeline.viz import example_grid, metric_curves


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _label(name: str, eps: float | None) -> str:
    return name if eps is None else f"{name} eps={eps:g}"


def _run_name(cfg: DictConfig) -> str:
    return " ".join(_overrides()) or _label(cfg.attack.name, cfg.attack.get("eps"))


def _tags(checkpoint: Checkpoint, checksums: dict[str, str]) -> dict[str, str]:
    tags = {"stage": "attack", "checkpoint": str(checkpoint.path),
            "checkpoint_hash": checkpoint.hash or "user-supplied",
            **{f"data_sha256.{name}": sha for name, sha in checksums.items()}}
    for key in ("test_accuracy", "train_run_id"):
        if key in checkpoint.info:
            tags[f"model.{key}"] = str(checkpoint.info[key])
    return tags


def _log_result(tracker: Tracker, run_id: str, cfg: DictConfig, result: AttackResult) -> None:
    for step, (eps, metrics, examples) in enumerate(zip(result.eps, result.metrics, result.examples,
                                                        strict=True)):
        tracker.log_metrics(run_id, metrics, step=step)
        title = f"{_label(cfg.attack.name, eps)} on {cfg.model.name}"
        name = "examples.png" if eps is None else f"examples_eps{eps:g}.png"
        tracker.log_figure(run_id, example_grid(examples, title), name)
    if len(result.eps) > 1:
        curves = {key: {"": (result.eps, [m[key] for m in result.metrics])}
                  for key in ("success_rate", "adv_accuracy", "l2_mean")}
        tracker.log_figure(run_id, metric_curves("eps", curves, f"{cfg.attack.name} eps list"),
                           "eps_curve.png")


def run(cfg: DictConfig) -> dict[str, float]:
    """Attack the (cached or freshly trained) classifier as `cfg` says; return the metrics of the
    last eps. Raises PipelineError subclasses for bad input, before any MLflow run is opened.

    Besides the attack metrics the run gets where its time went: `seconds_setup` (data,
    checkpoint, model; training too when it happens), `seconds_attack_step` (the Lightning
    test loop: clean pass, attack, evaluation) and `seconds_tracking` (MLflow and figures)."""
    start = time.perf_counter()
    data = instantiate(cfg.data)
    validate(cfg, test_set_size=data.test_size)
    tracker = Tracker.connect(cfg.tracking)
    data.prepare_data()
    checkpoint = checkpoint_for(cfg, data, tracker)
    classifier = load_classifier(checkpoint.path)
    indices, eval_set = data.eval_subset(cfg.n_eval, cfg.seed)
    opened = time.perf_counter()

    with tracker.run(cfg.tracking.experiment, _run_name(cfg), flatten(cfg),
                     _tags(checkpoint, data.checksums), parent_id=os.environ.get(PARENT_ENV)) as run_id:
        tracker.log_dict(run_id, OmegaConf.to_container(cfg, resolve=True), "config.yaml")
        tracker.log_dict(run_id, _overrides(), "overrides.yaml")
        tracker.log_dict(run_id, indices, "eval_indices.json")
        attack_start = time.perf_counter()
        result = run_attack(cfg, classifier, eval_set)
        attack_step = time.perf_counter() - attack_start
        tracker.set_tags(run_id, {"cpu_workers_used": str(result.cpu_workers)})
        _log_result(tracker, run_id, cfg, result)
        tracker.log_metrics(run_id, {
            "seconds_setup": opened - start, "seconds_attack_step": attack_step,
            "seconds_tracking": time.perf_counter() - opened - attack_step})

    for eps, m in zip(result.eps, result.metrics, strict=True):
        print(f"{_label(cfg.attack.name, eps)}: clean acc {m['clean_accuracy']:.2%}, "
              f"adv acc {m['adv_accuracy']:.2%}, success {m['success_rate']:.2%}, "
              f"L2 {m['l2_mean']:.3f}, {m['images_per_second']:,.0f} img/s")
    print(f"MLflow run {run_id} in {tracker.uri} (see it with `make ui`)")
    return result.metrics[-1]
