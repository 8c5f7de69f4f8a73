"""The attack step: a Lightning module whose test loop runs an attack over the eval subset."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.config import eps_values
from pipeline.metrics import per_sample, summarize
from pipeline.parallel import CoreSplit, cpu_workers
from pipeline.targets import choose_targets, random_offsets
from pipeline.trainer import lightning_trainer


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock timings cover the work they mean to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class AttackResult:
    eps: list[float]
    metrics: list[dict[str, float]]         # one dict of METRIC_KEYS per eps
    examples: list[dict[str, torch.Tensor]]  # first images of the subset, per eps, for the grid
    cpu_workers: int                         # slices each batch ran in (1: one call)


class AttackStep(L.LightningModule):
    """Attacks each test batch with `attack(model, x, y, eps=..., targeted=..., target=...)`
    for every eps value and keeps every image's outcome."""

    def __init__(self, classifier: nn.Module, attack: Callable, eps: list[float],
                 targeted: bool = False, target: str | int = "next",
                 offsets: torch.Tensor | None = None, n_examples: int = 16,
                 split: CoreSplit | None = None) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.attack, self.eps = attack, list(eps)
        self.targeted, self.target, self.n_examples = targeted, target, n_examples
        self.split = split  # on CPU: each batch as parallel single-threaded slices
        self.register_buffer("offsets", offsets, persistent=False)
        self.attack_seconds = 0.0
        self.samples = [defaultdict(list) for _ in self.eps]   # per eps: key → [(B,), ...]
        self.examples = [defaultdict(list) for _ in self.eps]  # per eps: key → [(b, ...), ...]
        self.n_kept = 0

    def _attack(self, x, y, target) -> list[torch.Tensor]:
        kwargs = {"targeted": self.targeted, "target": target}
        if len(self.eps) == 1:
            return [self.attack(self.classifier, x, y, eps=self.eps[0], **kwargs)]
        return list(self.attack(self.classifier, x, y, eps=self.eps, **kwargs))

    def _split(self, fn, *tensors):
        if self.split is not None and tensors[0].device.type == "cpu":
            return self.split(fn, *tensors)
        return fn(*tensors)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        def forward(xs):
            with torch.no_grad():  # worker threads do not inherit the test loop's no_grad
                return self.classifier(xs)
        return self._split(forward, x)

    def test_step(self, batch, batch_idx):
        x, y, position = batch  # (B, C, H, W) in [0, 1], (B,), (B,)
        clean_logits = self._logits(x)
        target = (choose_targets(self.target, y, clean_logits, self.offsets[position])
                  if self.targeted else None)
        sync(x.device)
        start = time.perf_counter()
        adversarials = self._split(self._attack, x, y, target)
        sync(x.device)
        self.attack_seconds += time.perf_counter() - start

        keep = min(self.n_examples - self.n_kept, len(x))
        for k, x_adv in enumerate(adversarials):
            outcome = per_sample(x, x_adv, y, clean_logits, self._logits(x_adv), target)
            for key, value in outcome.items():
                self.samples[k][key].append(value.cpu())
            if keep > 0:
                shown = {"x": x, "x_adv": x_adv, "y": y, **outcome}
                if target is not None:
                    shown["target"] = target
                for key, value in shown.items():
                    self.examples[k][key].append(value[:keep].detach().cpu())
        self.n_kept += max(keep, 0)

    def result(self) -> AttackResult:
        metrics, examples = [], []
        for eps, samples, shown in zip(self.eps, self.samples, self.examples, strict=True):
            summary = summarize({key: torch.cat(parts) for key, parts in samples.items()})
            n_images = sum(len(part) for part in samples["success"])
            summary.update(eps=eps, attack_seconds=self.attack_seconds,
                           images_per_second=n_images / self.attack_seconds)
            metrics.append(summary)
            examples.append({key: torch.cat(parts) for key, parts in shown.items()})
        return AttackResult(self.eps, metrics, examples, self.split.workers if self.split else 1)


def run_attack(cfg: DictConfig, classifier: nn.Module, eval_set: Dataset) -> AttackResult:
    """Attack every image of `eval_set` (image, label, position) as `cfg.attack` says."""
    trainer = lightning_trainer(cfg, inference_mode=False)  # attacks need gradients
    workers = cpu_workers(cfg.cpu_workers) if trainer.strategy.root_device.type == "cpu" else 1
    split = CoreSplit(workers) if workers > 1 else None
    step = AttackStep(classifier, instantiate(cfg.attack.fn), eps_values(cfg),
                      targeted=cfg.attack.targeted, target=cfg.attack.target,
                      offsets=random_offsets(len(eval_set), cfg.data.num_classes, cfg.seed),
                      n_examples=cfg.attack.n_examples, split=split)
    try:
        trainer.test(step, DataLoader(eval_set, batch_size=cfg.attack.batch_size), verbose=False)
    finally:
        if split is not None:
            split.close()
    return step.result()
