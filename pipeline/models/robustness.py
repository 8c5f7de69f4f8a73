"""Robustness measured while training: after every epoch the clean, FGSM and PGD accuracy of a fixed
set of validation images, the weights of the most robust epoch kept (Rice et al. 2020: robust
overfitting), and catastrophic overfitting caught as it happens (Wong et al. 2020: PGD accuracy
collapses while FGSM accuracy climbs, the model having learnt to mask its FGSM gradient)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import cast

import pytorch_lightning as L
import torch
from torch import nn

from pipeline.attacks import fgsm, pgd


def _net(module: L.LightningModule) -> nn.Module:
    """The classifier's network (a pipeline.models.Classifier's `net`)."""
    return cast(nn.Module, module.net)


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


@dataclass
class Overfit:
    """One detected episode of catastrophic overfitting."""

    epoch: int
    fgsm_accuracy: float
    pgd_accuracy: float
    action: str
    step_scale: float  # the inner step's scale from then on

    def message(self, method: str) -> str:
        then = {
            "warn": "training goes on; the weights kept are the most robust epoch's",
            "stop": "training stopped; the weights kept are the most robust epoch's",
            "restart": f"restarted from the most robust epoch's weights with the step × {self.step_scale:g}",
        }[self.action]
        return (
            f"warning: catastrophic overfitting in epoch {self.epoch}: PGD accuracy "
            f"{self.pgd_accuracy:.3f} while FGSM accuracy is {self.fgsm_accuracy:.3f} "
            f"(train.method={method}); {then}. A smaller train.alpha, train.method=n_fgsm or pgd avoids it"
        )


@dataclass(eq=False)  # a Lightning callback compares by identity
class RobustnessMonitor(L.Callback):
    """Measures the module's net on the first `n` validation images at radius `eps` after each
    training epoch (PGD: `steps` steps of 2.5·eps/steps from a random start seeded per image) and
    logs val_clean_accuracy, val_fgsm_accuracy and val_pgd_accuracy; restores the most robust
    epoch's weights when fitting ends. FGSM accuracy exceeding PGD accuracy by more than `gap`,
    once the training radius has reached `eps` (a model still being ramped up to it is weak at
    `eps` against PGD, not masking FGSM), is catastrophic overfitting: `action` warn (log it),
    stop (end training) or restart (return to the most robust weights and halve the inner
    attack's step)."""

    eps: float
    n: int
    steps: int
    gap: float
    action: str
    method: str = ""
    ramp_epochs: float = 0.0  # while eps ramps up, FGSM far above PGD at full eps is expected
    history: list[dict] = field(default_factory=list)
    overfits: list[Overfit] = field(default_factory=list)
    best_epoch: int | None = None
    best_state: dict | None = None
    step_seconds: float = 0.0  # wall time of the training steps (the batches, attacks included)
    check_seconds: float = 0.0  # wall time of these per-epoch measurements
    _batch_start: float = 0.0

    def __post_init__(self) -> None:
        super().__init__()

    @property
    def best(self) -> dict | None:
        return None if self.best_epoch is None else self.history[self.best_epoch]

    def measure(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        training = net.training
        net.eval()
        x_pgd = pgd(
            net, x, y, self.eps, norm="linf", alpha=None, steps=self.steps, random_start=True,
            restarts=1, seeds=torch.arange(len(x)),
        )  # fmt: skip
        scores = {
            "val_clean_accuracy": accuracy(net, x, y),
            "val_fgsm_accuracy": accuracy(net, cast(torch.Tensor, fgsm(net, x, y, self.eps)), y),
            "val_pgd_accuracy": accuracy(net, x_pgd, y),
        }
        net.train(training)
        return scores

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.step_seconds += time.perf_counter() - self._batch_start

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        start = time.perf_counter()
        x, y = (t[: self.n] for t in trainer.datamodule.val_set.tensors)  # type: ignore[attr-defined]
        x, y = x.to(module.device), y.to(module.device)
        scores = self.measure(_net(module), x, y)
        epoch = trainer.current_epoch
        module.log_dict(scores, on_step=False, on_epoch=True)
        self.history.append({"epoch": epoch, **scores})
        best = self.best
        if best is None or scores["val_pgd_accuracy"] > best["val_pgd_accuracy"]:
            self.best_epoch = epoch
            self.best_state = copy.deepcopy(_net(module).state_dict())
        ramped_up = epoch + 1 >= self.ramp_epochs  # the radius reached train.eps in this epoch
        if ramped_up and scores["val_fgsm_accuracy"] - scores["val_pgd_accuracy"] > self.gap:
            self._overfitting(trainer, module, epoch, scores)
        self.check_seconds += time.perf_counter() - start

    def _overfitting(self, trainer: L.Trainer, module: L.LightningModule, epoch: int, scores: dict) -> None:
        recipe = getattr(module, "recipe", None)
        scale = recipe.step_scale if recipe is not None else 1.0
        if self.action == "stop":
            trainer.should_stop = True
        elif self.action == "restart":
            if self.best_state is not None and self.best_epoch != epoch:
                _net(module).load_state_dict(self.best_state)
            scale /= 2
            if recipe is not None:
                recipe.step_scale = scale
        event = Overfit(epoch, scores["val_fgsm_accuracy"], scores["val_pgd_accuracy"], self.action, scale)
        self.overfits.append(event)
        print(event.message(self.method), flush=True)

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.best_state is not None:
            _net(module).load_state_dict(self.best_state)
