"""`run(cfg)`: one job of the pipeline, top to bottom — data, model (trained and cached, or
pretrained), attack, track."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import pytorch_lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.attack_step import AttackResult, run_attack
from pipeline.cli import in_multirun
from pipeline.config import build, check_devices, check_n_eval, config_hash, flatten, validate
from pipeline.metrics import robustness_curve
from pipeline.models import load_classifier
from pipeline.tracking import ui
from pipeline.tracking.figures import example_grid, metric_curves, min_norm_figure
from pipeline.tracking.resources import memory_mb, reset_peak
from pipeline.tracking.store import PARENT_ENV, SWEPT_ENV, Tracker
from pipeline.train import checkpoint_for


@dataclass
class Target:
    """The classifier under attack, its class names, and tags saying where it came from."""
    net: nn.Module
    class_names: list[str]
    tags: dict[str, str]


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _label(name: str, eps: float | None) -> str:
    return name if eps is None else f"{name} eps={eps:g}"


def _run_name(cfg: DictConfig) -> str:
    """The job's overrides; in a sweep only the swept ones (`eps=0.1`), which tell its runs apart
    in the MLflow UI (the parent run is named by the whole command)."""
    overrides = _overrides()
    swept = os.environ.get(SWEPT_ENV, "").split(",")
    named = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return " ".join(named or overrides) or _label(cfg.attack.name, cfg.attack.get("eps"))


def _target(cfg: DictConfig, data, tracker: Tracker) -> Target:
    """A pretrained ImageNet model (its photos read for it), or the cached or trained checkpoint."""
    if "pretrained" in cfg.model:
        model = build(cfg.model.pretrained)
        data.load(model.preprocess, model.class_names, model.net)
        tags = {"weights": model.source, "labels": data.label_source}
        if data.skipped:
            tags["skipped_images"] = ", ".join(data.skipped)[:5000]
        return Target(model.net, model.class_names, tags)
    checkpoint = checkpoint_for(cfg, data, tracker)
    return Target(load_classifier(checkpoint.path), [str(c) for c in range(cfg.data.num_classes)],
                  checkpoint.tags())


def per_image_table(names: list[str], class_names: list[str], samples: dict[str, torch.Tensor]) -> dict:
    """One row per attacked image: names of the true, clean and adversarial classes (and the
    target), confidences, norms and success — for MLflow's table view."""
    def named(key):
        return [class_names[i] for i in samples[key].tolist()]

    table = {"image": names, "true": named("y"), "clean": named("clean_pred"),
             "clean_confidence": samples["clean_confidence"].tolist(), "adversarial": named("adv_pred"),
             "adv_confidence": samples["adv_confidence"].tolist()}
    if "target" in samples:
        table["target"] = named("target")
    table |= {key: samples[key].tolist() for key in ("success", "l2", "linf")}
    return table


def _log_result(tracker: Tracker, run_id: str, cfg: DictConfig, result: AttackResult,
                target: Target, names: list[str]) -> None:
    for step, (eps, metrics, examples, samples) in enumerate(zip(
            result.eps, result.metrics, result.examples, result.samples, strict=True)):
        tracker.log_metrics(run_id, metrics, step=step)
        suffix = "" if eps is None else f"_eps{eps:g}"
        title = f"{_label(cfg.attack.name, eps)} on {cfg.model.name}"
        grid = example_grid(examples, title, class_names=target.class_names,
                            label_word="ref" if target.tags.get("labels", "").startswith("model") else "true")
        tracker.log_figure(run_id, grid, f"examples{suffix}.png", image_key=ui.IMAGE_KEY, step=step)
        tracker.log_table(run_id, per_image_table(names, target.class_names, samples),
                          f"per_image{suffix}.json")
        if eps is None:  # a minimal-perturbation attack: the norms it found and what they imply
            radii, accuracy = robustness_curve(samples)
            norms = samples["l2"][samples["success"]].tolist()
            tracker.log_figure(run_id, min_norm_figure(norms, radii, accuracy, f"{title}: minimal L2"),
                               "min_norm.png")
            tracker.log_table(run_id, {"l2_budget": radii, "accuracy": accuracy},
                              "robustness_curve.json")
    if len(result.eps) > 1:
        curves = {key: {"": (result.eps, [m[key] for m in result.metrics])}
                  for key in ("success_rate", "adv_accuracy", "l2_mean")}
        tracker.log_figure(run_id, metric_curves("eps", curves, f"{cfg.attack.name} eps list"),
                           "eps_curve.png")


def _done_before(cfg: DictConfig, tracker: Tracker, digest: str):
    """In a resumed sweep, this point's FINISHED run under the parent, if there is one."""
    parent = os.environ.get(PARENT_ENV)
    if not (parent and cfg.resume):
        return None
    runs = tracker.find_runs(cfg.tracking.experiment, **{MLFLOW_PARENT_RUN_ID: parent, "config_hash": digest})
    return next((r for r in runs if r.info.status == "FINISHED"), None)


def _rank() -> int:
    """This process's rank in a multi-device attack step (0 when there is none)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _inputs(cfg: DictConfig, tracker: Tracker):
    """Seeded (python, numpy, torch, loader workers): the data, the classifier under attack, and
    the eval subset (test-set indices and dataset)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = build(cfg.data.module)
    data.prepare_data()
    target = _target(cfg, data, tracker)
    check_n_eval(cfg.n_eval, data.test_size)
    indices, eval_set = data.eval_subset(cfg.n_eval, cfg.seed)
    return data, target, indices, eval_set


def _attack_share(cfg: DictConfig, tracker: Tracker) -> dict[str, float]:
    cfg = cfg.copy()
    cfg.train.force = False  # rank 0 has just (re)trained it
    _, target, _, eval_set = _inputs(cfg, tracker)
    run_attack(cfg, target.net, eval_set)
    return {}


def run(cfg: DictConfig) -> dict[str, float]:
    """Attack the classifier as `cfg` says; return the metrics of the last eps. Raises
    PipelineError subclasses for bad input, before any MLflow run is opened. In a resumed sweep
    a point that already has a FINISHED run is skipped (its metrics are returned).

    Besides the attack metrics the run gets where its time went: `seconds_setup` (data, model;
    training too when it happens), `seconds_attack_step` (the Lightning test loop: clean pass,
    attack, evaluation) and `seconds_tracking` (MLflow and figures), and its memory: `rss_mb` at
    the end and `peak_rss_mb` during the job."""
    start = time.perf_counter()
    validate(cfg)
    check_devices(cfg, in_multirun())
    tracker = Tracker.connect(cfg.tracking)
    if _rank() > 0:  # a DDP worker Lightning started: attack its share, rank 0 tracks
        return _attack_share(cfg, tracker)
    digest = config_hash(cfg)
    done = _done_before(cfg, tracker, digest)
    if done is not None:
        print(f"{_run_name(cfg)}: already done in run {done.info.run_id}; skipped")
        return dict(done.data.metrics)
    try:
        return _attack_and_log(cfg, tracker, digest, start)
    finally:
        gc.collect()  # models, data and figures of this job go before the next job of a sweep


def _attack_and_log(cfg: DictConfig, tracker: Tracker, digest: str, start: float) -> dict[str, float]:
    reset_peak()
    data, target, indices, eval_set = _inputs(cfg, tracker)
    names = [data.names[i] for i in indices]
    opened = time.perf_counter()

    tags = {"stage": "attack", "config_hash": digest, **target.tags,
            **{f"data_sha256.{name}": sha for name, sha in data.checksums.items()}}
    with tracker.run(cfg.tracking.experiment, _run_name(cfg), flatten(cfg), tags,
                     parent_id=os.environ.get(PARENT_ENV)) as run_id:
        tracker.log_dict(run_id, OmegaConf.to_container(cfg, resolve=True), "config.yaml")
        tracker.log_dict(run_id, _overrides(), "overrides.yaml")
        tracker.log_dict(run_id, indices, "eval_indices.json")
        attack_start = time.perf_counter()
        result = run_attack(cfg, target.net, eval_set)
        attack_step = time.perf_counter() - attack_start
        tracker.set_tags(run_id, {"cpu_workers_used": str(result.cpu_workers)})
        _log_result(tracker, run_id, cfg, result, target, names)
        tracker.log_metrics(run_id, {
            "seconds_setup": opened - start, "seconds_attack_step": attack_step,
            "seconds_tracking": time.perf_counter() - opened - attack_step, **memory_mb()})

    for eps, m in zip(result.eps, result.metrics, strict=True):
        print(f"{_label(cfg.attack.name, eps)}: clean acc {m['clean_accuracy']:.2%}, "
              f"adv acc {m['adv_accuracy']:.2%}, success {m['success_rate']:.2%}, "
              f"L2 {m['l2_mean']:.3f}, {m['images_per_second']:,.0f} img/s")
    print(f"MLflow run {run_id} in {tracker.uri}: {tracker.run_url(run_id)}")
    return result.metrics[-1]
