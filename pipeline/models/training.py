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
from pipeline.models.robustness import RobustnessMonitor
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
        """MLflow tags naming the checkpoint a run used, and what its training recorded (its card)."""
        tags = {"checkpoint": str(self.path), "checkpoint_hash": self.hash or "user-supplied"}
        for key in CARD_TAGS:
            if self.info.get(key) is not None:
                tags[f"model.{key}"] = str(self.info[key])
        return tags


# what an attack run's tags say about its model (`model.<key>`), from the checkpoint's card
CARD_TAGS = (
    "recipe",
    "test_accuracy",
    "val_pgd_accuracy",
    "best_epoch",
    "catastrophic_overfitting",
    "train_run_id",
)


def recipe(train: dict) -> str:
    """One line saying how a model was trained, e.g. "adversarial fgsm_rs eps=0.3, 10 epochs"."""
    if not train.get("method"):
        return f"{train.get('name', 'default')}, {train['epochs']} epochs"
    keys = ["eps", "alpha", "ramp_epochs"]
    keys += {"pgd": ["steps"], "trades": ["beta", "steps"], "n_fgsm": ["noise"]}.get(train["method"], [])
    settings = " ".join(f"{k}={train[k]}" for k in keys if train.get(k) is not None)
    return f"{train.get('name', 'adversarial')} {train['method']} {settings}, {train['epochs']} epochs"


def training_config(cfg: DictConfig, checksums: dict[str, str]) -> dict:
    """Everything that determines the weights: model, data (and its checksums), training, seed,
    numeric precision. (The device is left out: a CPU- and a GPU-trained model of one config
    share a cache entry.)"""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    assert isinstance(train, dict)  # cfg.train is a mapping
    for knob in ("force", "log_every_n_steps", "name"):  # do not change the weights
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
    train_cfg = OmegaConf.to_container(cfg.train, resolve=True)
    assert isinstance(train_cfg, dict)  # cfg.train is a mapping
    model = Classifier(
        net=config["model"]["net"],
        num_classes=cfg.data.num_classes,
        lr=cfg.train.lr,
        max_lr=cfg.train.max_lr,
        weight_decay=cfg.train.weight_decay,
        adversarial=train_cfg if train_cfg.get("method") else None,
    )
    monitor = _monitor(train_cfg)
    card = recipe(train_cfg)
    tags = {"stage": "train", "checkpoint_hash": digest, "checkpoint": str(path), "recipe": card}
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
            callbacks=[monitor] if monitor else [],
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
            "recipe": card,
            "test_accuracy": result["test_accuracy"],
            "train_seconds": seconds,
            "epochs_run": trainer.current_epoch,
            "train_run_id": run_id,
            **(_robustness_card(monitor) if monitor else {}),
            "config": config,
        }
        tracker.log_metrics(run_id, {"test_accuracy": result["test_accuracy"], "train_seconds": seconds})
        if monitor and monitor.overfits:
            tracker.set_tags(run_id, {"catastrophic_overfitting": info["catastrophic_overfitting"]})
        if monitor:
            tracker.set_tags(run_id, {"best_epoch": str(monitor.best_epoch)})
        tracker.log_dict(run_id, info, "model_card.json")
        tracker.log_artifact(run_id, path, "checkpoint")
        view = tracker.save_view(
            experiment,
            "training",
            "training curves of every cached model",
            ui.training_view(tracker.metrics(run_id)),
        )
    robust = f", PGD accuracy {info['val_pgd_accuracy']:.4f} (validation)" if monitor else ""
    print(
        f"trained {cfg.model.name} ({card}): test accuracy {result['test_accuracy']:.4f}{robust} "
        f"in {seconds:.1f} s → {path}\nMLflow training run: {tracker.run_url(run_id)}\n"
        f"every cached model's training curves: {view}"
    )
    return info


def _monitor(train: dict) -> RobustnessMonitor | None:
    """The per-epoch robustness check of `train.robust_eval` (None: standard training without one)."""
    check = train.get("robust_eval")
    if not check:
        return None
    overfit = train.get("overfit") or {"gap": 1.0, "action": "warn"}
    return RobustnessMonitor(
        eps=train["eps"],
        n=check["n"],
        steps=check["steps"],
        gap=overfit["gap"],
        action=overfit["action"],
        method=train.get("method", ""),
        ramp_epochs=train.get("ramp_epochs", 0.0),
    )


def _robustness_card(monitor: RobustnessMonitor) -> dict:
    """What the model card records of the per-epoch robustness check."""
    best = monitor.best or {}
    return {
        "best_epoch": monitor.best_epoch,
        "val_clean_accuracy": best.get("val_clean_accuracy"),
        "val_fgsm_accuracy": best.get("val_fgsm_accuracy"),
        "val_pgd_accuracy": best.get("val_pgd_accuracy"),
        "robustness_per_epoch": monitor.history,
        "train_step_seconds": monitor.step_seconds,
        "robust_eval_seconds": monitor.check_seconds,
        "catastrophic_overfitting": "; ".join(
            f"epoch {o.epoch}: FGSM {o.fgsm_accuracy:.3f} vs PGD {o.pgd_accuracy:.3f}, {o.action}"
            for o in monitor.overfits
        )
        or None,
    }
