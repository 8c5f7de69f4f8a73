"""`run(cfg)`: one attack job, top to bottom — seed → data → model → eval subset → attack →
metrics → MLflow."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline import masking
from pipeline.attack_step import AttackResult, run_attack
from pipeline.attacks.ensemble import BROKEN_BY, COMPONENT_SECONDS, components
from pipeline.config import build, check_n_eval, config_hash, flatten, is_pretrained, source_config, validate
from pipeline.metrics import component_summary, robustness_curve
from pipeline.models import load_classifier
from pipeline.models.training import checkpoint_for
from pipeline.tracking import ui
from pipeline.tracking.figures import component_bars, example_grid, metric_curves, min_norm_figure
from pipeline.tracking.resources import memory_mb, reset_peak
from pipeline.tracking.store import PARENT_ENV, SWEPT_ENV, Tracker


def run(cfg: DictConfig) -> dict[str, float]:
    """Attack the classifier as `cfg` says; return the metrics of the last eps. Raises
    PipelineError subclasses for bad input, before any MLflow run is opened.

    Besides the attack metrics the run gets where its time went: `seconds_setup` (data, model;
    training too when it happens), `seconds_attack_step` (the Lightning test loop: clean pass,
    attack, evaluation) and `seconds_tracking` (MLflow and figures), and its memory: `rss_mb` at
    the end and `peak_rss_mb` during the job."""
    start = time.perf_counter()
    validate(cfg)
    tracker = Tracker.connect(cfg.tracking)
    tracker.check_writable(cfg.tracking.experiment)  # before any training or attacking
    job = _run_control(cfg, tracker)
    if job.done is not None:
        return job.done
    cfg = job.cfg
    try:
        reset_peak()
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # python, numpy, torch, loader workers
        data = build(cfg.data.module)
        data.prepare_data()
        victim = _model_under_attack(cfg, data, tracker)
        surrogate = _surrogate(cfg, data, tracker)
        surrogate_net = surrogate.net if surrogate is not None else None
        check_n_eval(cfg.n_eval, data.test_size)
        indices, eval_set = data.eval_subset(cfg.n_eval, cfg.seed)
        if not job.tracked:
            run_attack(cfg, victim.net, eval_set, surrogate_net)
            return {}

        setup_done = time.perf_counter()
        with _attack_run(cfg, tracker, data, victim, indices, surrogate) as run_id:
            result = run_attack(cfg, victim.net, eval_set, surrogate_net)
            attack_done = time.perf_counter()
            tracker.set_tags(run_id, {"cpu_workers_used": str(result.cpu_workers)})
            suspicions = _masking_checks(cfg, result)
            tracker.set_tags(run_id, _masking_tags(suspicions))
            _log_result(tracker, run_id, cfg, result, victim, [data.names[i] for i in indices])
            tracker.log_metrics(
                run_id,
                {
                    "seconds_setup": setup_done - start,
                    "seconds_attack_step": attack_done - setup_done,
                    "seconds_tracking": time.perf_counter() - attack_done,
                    **memory_mb(),
                },
            )
        _print_summary(cfg, result, tracker, run_id)
        for suspicion in suspicions:
            print(f"warning: masking_suspect: {suspicion.message}")
        return result.metrics[-1]
    finally:
        gc.collect()  # models, data and figures of this job go before the next job of a sweep


@dataclass
class Job:
    """What the run-control guards decided for this process."""

    cfg: DictConfig
    tracked: bool = True  # False on a DDP worker rank: rank 0 tracks
    done: dict[str, float] | None = None  # a resumed sweep's point that already has a FINISHED run


def _run_control(cfg: DictConfig, tracker: Tracker) -> Job:
    """The guards in front of the data flow. A DDP worker rank that Lightning started attacks its
    share of the images untracked, and does not retrain the checkpoint rank 0 has just made. In a
    resumed sweep a point with a FINISHED run under the parent is skipped (its metrics returned)."""
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) > 0:
        worker = cfg.copy()
        worker.train.force = False
        return Job(worker, tracked=False)
    parent = os.environ.get(PARENT_ENV)
    if parent and cfg.resume:
        digest = config_hash(cfg)
        done = next(
            (
                r
                for r in tracker.children(cfg.tracking.experiment, parent)
                if r.info.status == "FINISHED" and r.data.tags.get("config_hash") == digest
            ),
            None,
        )
        if done is not None:
            print(f"{_run_name(cfg)}: already done in run {done.info.run_id}; skipped")
            return Job(cfg, done=dict(done.data.metrics))
    return Job(cfg)


@dataclass
class Victim:
    """The classifier under attack, its class names, and tags saying where it came from."""

    net: nn.Module
    class_names: list[str]
    tags: dict[str, str]


def _model_under_attack(cfg: DictConfig, data, tracker: Tracker) -> Victim:
    """A pretrained ImageNet model (its photos read for it), or the cached or trained checkpoint."""
    if is_pretrained(cfg):
        model = build(cfg.model.pretrained)
        data.load(model.preprocess, model.class_names, model.net)
        tags = {"weights": model.source, "labels": data.label_source}
        if data.skipped:
            tags["skipped_images"] = ", ".join(data.skipped)[:5000]
        return Victim(model.net, model.class_names, tags)
    checkpoint = checkpoint_for(cfg, data, tracker)
    return Victim(
        load_classifier(checkpoint.path), [str(c) for c in range(cfg.data.num_classes)], checkpoint.tags()
    )


def _surrogate(cfg: DictConfig, data, tracker: Tracker) -> Victim | None:
    """A transfer attack's surrogate (`attack.source`): a checkpoint file, or the model config's
    cached or trained checkpoint under this job's data and training settings."""
    source = cfg.attack.get("source")
    if source is None:
        return None
    if str(source).endswith(".ckpt"):
        return Victim(load_classifier(str(source)), [], {"source": str(source)})
    checkpoint = checkpoint_for(source_config(cfg), data, tracker)
    tags = {f"source.{key}": value for key, value in checkpoint.tags().items()}
    return Victim(load_classifier(checkpoint.path), [], {"source": str(source), **tags})


def _masking_checks(cfg: DictConfig, result: AttackResult) -> list[masking.Suspicion]:
    """The gradient-masking checks that apply to this job's outcomes (pipeline.masking)."""
    settings = cfg.masking
    found = [
        masking.unbounded_not_reached(
            result.eps,
            cfg.attack.get("norm", "linf"),
            result.metrics,
            settings.unbounded_eps,
            settings.unbounded_accuracy,
        )
    ]
    for samples in result.samples:
        if "versions" in cfg.attack:
            parts = components(cfg.attack.versions, cfg.attack.version)
            found.append(masking.blackbox_beats_whitebox(samples, parts, settings.tolerance))
        found.append(masking.transfer_beats_whitebox(samples, settings.tolerance))
    return [s for s in found if s is not None]


def _masking_tags(suspicions: list[masking.Suspicion]) -> dict[str, str]:
    if not suspicions:
        return {}
    return {"masking_suspect": "true", **{f"masking.{s.check}": str(s.count) for s in suspicions}}


@contextmanager
def _attack_run(
    cfg: DictConfig, tracker: Tracker, data, victim: Victim, indices: list[int], surrogate: Victim | None
) -> Iterator[str]:
    """The job's MLflow run (a child of the sweep's parent, if any) with its config, overrides
    and eval-subset indices logged; it ends FINISHED, or FAILED/KILLED with the error."""
    tags = {
        "stage": "attack",
        "config_hash": config_hash(cfg),
        **victim.tags,
        **(surrogate.tags if surrogate is not None else {}),
        **{f"data_sha256.{name}": sha for name, sha in data.checksums.items()},
    }
    artifacts = {
        "config.yaml": OmegaConf.to_container(cfg, resolve=True),
        "overrides.yaml": _overrides(),
        "eval_indices.json": indices,
    }
    with tracker.run(
        cfg.tracking.experiment, _run_name(cfg), flatten(cfg), tags, parent_id=os.environ.get(PARENT_ENV)
    ) as run_id:
        for artifact_file, content in artifacts.items():
            tracker.log_dict(run_id, content, artifact_file)
        yield run_id


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


def _log_result(
    tracker: Tracker, run_id: str, cfg: DictConfig, result: AttackResult, victim: Victim, names: list[str]
) -> None:
    for step, (eps, metrics, examples, samples) in enumerate(
        zip(result.eps, result.metrics, result.examples, result.samples, strict=True)
    ):
        suffix = "" if eps is None else f"_eps{eps:g}"
        title = f"{_label(cfg.attack.name, eps)} on {cfg.model.name}"
        grid = example_grid(
            examples,
            title,
            class_names=victim.class_names,
            label_word="ref" if victim.tags.get("labels", "").startswith("model") else "true",
        )
        tracker.log_figure(run_id, grid, f"examples{suffix}.png", image_key=ui.IMAGE_KEY, step=step)
        tracker.log_table(
            run_id, per_image_table(names, victim.class_names, samples), f"per_image{suffix}.json"
        )
        if BROKEN_BY in samples:  # an ensemble: which component broke each image, and its time
            _log_components(tracker, run_id, cfg, samples, metrics, suffix, title)
        tracker.log_metrics(run_id, metrics, step=step)
        if eps is None:  # a minimal-perturbation attack: the norms it found and what they imply
            radii, accuracy = robustness_curve(samples)
            norms = samples["l2"][samples["success"]].tolist()
            tracker.log_figure(
                run_id, min_norm_figure(norms, radii, accuracy, f"{title}: minimal L2"), "min_norm.png"
            )
            tracker.log_table(run_id, {"l2_budget": radii, "accuracy": accuracy}, "robustness_curve.json")
    if len(result.eps) > 1:
        curves = {
            key: {"": (result.eps, [m[key] for m in result.metrics])}
            for key in ("success_rate", "adv_accuracy", "l2_mean")
        }
        tracker.log_figure(
            run_id, metric_curves("eps", curves, f"{cfg.attack.name} eps list"), "eps_curve.png"
        )


def _log_components(  # an ensemble's breakdown: which component broke each image, and its time
    tracker: Tracker, run_id: str, cfg: DictConfig, samples, metrics, suffix: str, title: str
) -> None:
    names = [str(c["name"]) for c in components(cfg.attack.versions, cfg.attack.version)]
    summary = component_summary(
        samples[BROKEN_BY], samples[COMPONENT_SECONDS], names, metrics["attack_seconds"]
    )
    per_component: dict[str, float] = {}
    for name, broken, accuracy, seconds in zip(*summary.values(), strict=True):
        per_component |= {
            f"broken_by_{name}": broken,
            f"robust_accuracy_after_{name}": accuracy,
            f"seconds_{name}": seconds,
        }
    metrics.update(per_component)  # logged with the run's metrics, and returned by run()
    tracker.log_table(run_id, summary, f"components{suffix}.json")
    tracker.log_figure(run_id, component_bars(summary, f"{title}: components"), f"components{suffix}.png")


def per_image_table(names: list[str], class_names: list[str], samples: dict[str, torch.Tensor]) -> dict:
    """One row per attacked image: names of the true, clean and adversarial classes (and the
    target), confidences, norms and success — for MLflow's table view."""

    def named(key):
        return [class_names[i] for i in samples[key].tolist()]

    table = {
        "image": names,
        "true": named("y"),
        "clean": named("clean_pred"),
        "clean_confidence": samples["clean_confidence"].tolist(),
        "adversarial": named("adv_pred"),
        "adv_confidence": samples["adv_confidence"].tolist(),
    }
    if "target" in samples:
        table["target"] = named("target")
    table |= {key: samples[key].tolist() for key in ("success", "l2", "linf")}
    return table


def _print_summary(cfg: DictConfig, result: AttackResult, tracker: Tracker, run_id: str) -> None:
    for eps, m in zip(result.eps, result.metrics, strict=True):
        print(
            f"{_label(cfg.attack.name, eps)}: clean acc {m['clean_accuracy']:.2%}, "
            f"adv acc {m['adv_accuracy']:.2%}, success {m['success_rate']:.2%}, "
            f"L2 {m['l2_mean']:.3f}, {m['images_per_second']:,.0f} img/s"
        )
        after = "robust_accuracy_after_"
        parts = [key[len(after) :] for key in m if key.startswith(after)]
        if parts:  # an ensemble: what each component added
            print(
                "  components: "
                + ", ".join(
                    f"{p} broke {m[f'broken_by_{p}']:.0f} → {m[after + p]:.2%} ({m[f'seconds_{p}']:.0f} s)"
                    for p in parts
                )
            )
    print(f"MLflow run {run_id} in {tracker.uri}: {tracker.run_url(run_id)}")
