"""Training: a cached checkpoint per training config, trained (and tracked) only when missing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as L
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from pipeline.config import flatten, short_hash
from pipeline.data.mnist import MNISTData
from pipeline.errors import CheckpointError
from pipeline.models import Classifier
from pipeline.models.trainer import lightning_trainer
from pipeline.tracking import ui
from pipeline.tracking.store import Tracker

CACHE_VERSION = 1  # bump when training code changes what a config's weights are


@dataclass
class Checkpoint:
    path: Path
    hash: str  # "" for a checkpoint given by the user
    info: dict  # what training recorded next to it (test accuracy, run id, ...)

    def tags(self) -> dict[str, str]:
        """MLflow tags naming the checkpoint a run used, and what its training recorded."""
        tags = {"checkpoint": str(self.path), "checkpoint_hash": self.hash or "user-supplied"}
        for key in ("test_accuracy", "train_run_id"):
            if key in self.info:
                tags[f"model.{key}"] = str(self.info[key])
        return tags


def training_config(cfg: DictConfig, checksums: dict[str, str]) -> dict:
    """Everything that determines the weights: model, data (and its checksums), training, seed,
    numeric precision. (The device is left out: a CPU- and a GPU-trained model of one config
    share a cache entry.)"""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    assert isinstance(train, dict)  # cfg.train is a mapping
    for knob in ("force", "log_every_n_steps"):  # do not change the weights
        train.pop(knob, None)
    data = OmegaConf.to_container(cfg.data.module, resolve=True)
    assert isinstance(data, dict)  # cfg.data.module is a mapping
    for where in ("root", "_target_", "eval_batch_size"):  # where the files sit does not matter
        data.pop(where, None)
    return {
        "cache_version": CACHE_VERSION,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {**data, "sha256": checksums},
        "train": train,
        "seed": cfg.seed,
        "precision": cfg.trainer.precision,
    }


def checkpoint_hash(config: dict) -> str:
    return short_hash(json.dumps(config, sort_keys=True))


def checkpoint_for(cfg: DictConfig, data: MNISTData, tracker: Tracker) -> Checkpoint:
    """The checkpoint to attack: `cfg.checkpoint` if given, else the cached one, trained if needed."""
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser().resolve()
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} does not exist; pass an existing .ckpt "
                "(see outputs/checkpoints/) or drop `checkpoint=` to train one"
            )
        return Checkpoint(path, "", {})
    config = training_config(cfg, data.checksums)
    digest = checkpoint_hash(config)
    path = Path(cfg.paths.checkpoints).resolve() / f"{cfg.model.name}-{digest}.ckpt"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file() and not cfg.train.force:
        return Checkpoint(path, digest, json.loads(sidecar.read_text()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):  # parallel jobs of a sweep: one trains, the others wait
        if path.is_file() and sidecar.is_file() and not cfg.train.force:  # trained meanwhile
            return Checkpoint(path, digest, json.loads(sidecar.read_text()))
        info = train(cfg, data, tracker, config, digest, path)
        sidecar.write_text(json.dumps(info, indent=2))
    return Checkpoint(path, digest, info)


def train(cfg: DictConfig, data: MNISTData, tracker: Tracker, config: dict, digest: str, path: Path) -> dict:
    """Fit, test on the full test set, save to `path`; all inside its own MLflow run."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = Classifier(
        net=config["model"]["net"],
        num_classes=cfg.data.num_classes,
        lr=cfg.train.lr,
        max_lr=cfg.train.max_lr,
        weight_decay=cfg.train.weight_decay,
    )
    tags = {"stage": "train", "checkpoint_hash": digest, "checkpoint": str(path)}
    experiment = f"{cfg.tracking.experiment}-train"
    with tracker.run(experiment, f"train {cfg.model.name} {digest[:8]}", flatten(config), tags) as run_id:
        logger = tracker.lightning_logger(experiment, run_id)
        trainer = lightning_trainer(
            cfg,
            logger=logger,
            max_epochs=cfg.train.epochs,
            log_every_n_steps=cfg.train.log_every_n_steps,
            devices=1,
            strategy="auto",
        )  # weights independent of devices
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
        (result,) = trainer.test(model, datamodule=data, verbose=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        trainer.save_checkpoint(partial, weights_only=True)
        partial.replace(path)  # never leave a half-written checkpoint under the cached name
        info = {
            "checkpoint_hash": digest,
            "test_accuracy": result["test_accuracy"],
            "train_seconds": seconds,
            "train_run_id": run_id,
            "config": config,
        }
        tracker.log_metrics(run_id, {"test_accuracy": result["test_accuracy"], "train_seconds": seconds})
        tracker.log_artifact(run_id, path, "checkpoint")
        view = tracker.save_view(
            experiment,
            "training",
            "training curves of every cached model",
            ui.training_view(tracker.metrics(run_id)),
        )
    print(
        f"trained {cfg.model.name}: test accuracy {result['test_accuracy']:.4f} "
        f"in {seconds:.1f} s → {path}\nMLflow training run: {tracker.run_url(run_id)}\n"
        f"every cached model's training curves: {view}"
    )
    return info
