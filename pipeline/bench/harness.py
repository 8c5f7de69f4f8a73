"""`run_bench(cfg)`: load the model and images once, run the chosen sections, report."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.bench import report as rep
from pipeline.bench.implementations import ATTACKS, RUN_KEYS, Setup, configure, hyper_parameters
from pipeline.bench.sections import attack_rows, end_to_end, eps_list_row, model_passes, training
from pipeline.bench.startup import startup_seconds
from pipeline.config import build, is_pretrained
from pipeline.errors import ConfigError
from pipeline.models import load_classifier
from pipeline.models.fast import attacked_model
from pipeline.models.training import checkpoint_for
from pipeline.parallel import CoreSplit, cpu_workers
from pipeline.tracking.store import Tracker, provenance_tags

SECTIONS = ("attacks", "model_passes", "eps_list", "training", "end_to_end", "startup")


def _validate(cfg: DictConfig, test_set_size: int) -> torch.device:
    if is_pretrained(cfg):
        raise ConfigError(
            "the benchmark runs on MNIST models (data=mnist, model=cnn, ...); time a "
            "pretrained ImageNet model with `python -m pipeline data=imagenet ...`"
        )
    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"no benchmark for attack(s) {unknown}; choose from {sorted(ATTACKS)}")
    bad_sections = [s for s in cfg.sections if s not in SECTIONS]
    if bad_sections:
        raise ConfigError(f"unknown section(s) {bad_sections}; choose from {list(SECTIONS)}")
    checks = [
        (key, cfg[key], upper)
        for key, upper in (("n", test_set_size), ("batch_size", None), ("repeats", None))
    ]
    for name in cfg.attacks:  # per_attack: the attack's config, image counts and repeats
        own = _per_attack(cfg, name)
        hyper_parameters(name, own)
        checks += [(f"per_attack.{name}.{key}", own[key], None) for key in RUN_KEYS if key in own]
    for key, value, upper in checks:
        if not isinstance(value, int) or value <= 0 or (upper and value > upper):
            raise ConfigError(
                f"{key}={value} must be a positive integer" + (f" up to {upper}" if upper else "")
            )
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return device


def _per_attack(cfg: DictConfig, name: str) -> DictConfig:
    """conf/attack/<name>.yaml with conf/bench.yaml's per_attack.<name> over it."""
    own = cfg.per_attack.get(name)
    if own is None:
        raise ConfigError(
            f"per_attack.{name} is missing: conf/bench.yaml composes every attack "
            f"under per_attack (attack@per_attack.{name}: {name})"
        )
    return own


def run_bench(cfg: DictConfig) -> dict:
    data = build(cfg.data.module)
    device = _validate(cfg, data.test_size)
    tracker = Tracker.connect(cfg.tracking)
    data.prepare_data()
    path = cfg.checkpoint or checkpoint_for(cfg, data, tracker).path
    model = load_classifier(path).to(device).requires_grad_(False)
    _, subset = data.eval_subset(cfg.n, cfg.seed)
    x, y, _ = (t.to(device) for t in subset.tensors)
    workers = cpu_workers(cfg.cpu_workers) if device.type == "cpu" else 1
    with ExitStack() as stack:
        split = stack.enter_context(CoreSplit(workers)) if workers > 1 else None
        setup = Setup(
            model, float(cfg.eps), cfg.batch_size, device, tuple(x.shape[1:]), cfg.data.num_classes, split
        )
        attacked = attacked_model(model, cfg.fast_cpu_model, device)  # as the attack step attacks it
        setup.fast_model = attacked if attacked is not model else None
        report = _sections(cfg, setup, x, y, tracker, str(path))
    paths = rep.save(report, Path(cfg.paths.outputs) / "bench")
    report["mlflow_run_id"] = rep.log(tracker, cfg.tracking.experiment, report, paths)
    print(rep.markdown(report))
    for finding in rep.findings(report):
        print(f"finding: {finding}")
    print(f"written: {paths[0]} and {paths[1]}; MLflow run {report['mlflow_run_id']}")
    return report


def _sections(cfg: DictConfig, setup: Setup, x, y, tracker: Tracker, checkpoint: str) -> dict:
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": provenance_tags()["git_commit"],
        "machine": rep.machine(setup.device),
        "checkpoint": checkpoint,
        "cpu_workers": setup.split.workers if setup.split else 1,
        # a DictConfig's container is a dict
        "config": {
            k: cast(dict, OmegaConf.to_container(cfg, resolve=True))[k]
            for k in ("attacks", "n", "batch_size", "device", "repeats", "eps", "sections", "fast_cpu_model")
        },
    }
    sections = set(cfg.sections)
    if "attacks" in sections:
        report["attacks"] = []
        for name in cfg.attacks:  # slow attacks use fewer images and repeats: n and repeats cap them
            own = _per_attack(cfg, name)
            n, repeats = own.get("n", cfg.n), min(own.get("repeats", cfg.repeats), cfg.repeats)
            report["attacks"] += attack_rows(name, configure(setup, name, own), x[:n], y[:n], repeats)
    if "model_passes" in sections:
        report["model_passes"] = model_passes(setup, x, y, cfg.repeats)
    if "eps_list" in sections:
        report["eps_list"] = eps_list_row(setup, list(cfg.eps_list), x, y, cfg.repeats)
    if "training" in sections:
        report["training"] = training(cfg, tracker)
    if "end_to_end" in sections:
        report["end_to_end"] = end_to_end(cfg, checkpoint)
    if "startup" in sections:
        report["startup"] = startup_seconds()
    return report
