"""The attack step: a Lightning module whose test loop runs an attack over the eval subset."""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import cast

import pytorch_lightning as L
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.attacks.ensemble import BROKEN_BY, COMPONENT_SECONDS
from pipeline.attacks.losses import succeeded
from pipeline.attacks.targets import choose_targets, random_offsets
from pipeline.config import attack_fn, eps_values
from pipeline.errors import raise_if_stopped
from pipeline.metrics import min_norm_summary, per_sample, summarize
from pipeline.models.fast import attacked_model
from pipeline.models.trainer import lightning_trainer
from pipeline.parallel import CoreSplit, cpu_workers, split_or_call


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall-clock timings cover the work they mean to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PassCounter:
    """Counts the images that go through `model`'s forward and backward passes while `counting`
    (a forward hook, and a gradient hook on outputs that need gradients; thread-safe)."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = 0
        self.counting = False
        self._lock = threading.Lock()
        self._handle = model.register_forward_hook(self._on_forward)

    def _add(self, which: str, n: int) -> None:
        with self._lock:
            setattr(self, which, getattr(self, which) + n)

    def _on_forward(self, module, inputs, output) -> None:
        if self.counting:
            self._add("forward", output.shape[0])
            if output.requires_grad:
                output.register_hook(lambda grad: self._add("backward", grad.shape[0]))

    def remove(self) -> None:
        self._handle.remove()


@dataclass
class AttackResult:
    eps: list[float | None]  # None: an attack without an eps budget
    metrics: list[dict[str, float]]  # one dict of METRIC_KEYS per eps
    examples: list[dict[str, torch.Tensor]]  # first images of the subset, per eps, for the grid
    samples: list[dict[str, torch.Tensor]]  # every image's outcome (and label, target), per eps
    cpu_workers: int  # slices each batch ran in (1: one call)


@dataclass
class Adversarials:
    """What one attack call made of a batch: an adversarial batch per eps, and the per-image
    diagnostics the attack wrote into `info=` (e.g. lbfgs' final c)."""

    images: list[torch.Tensor]
    info: dict[str, torch.Tensor]


@dataclass
class Share:
    """What one DDP rank attacked, sent to every rank at the end of the test loop."""

    samples: Sequence[Mapping[str, list[torch.Tensor]]]
    examples: Sequence[Mapping[str, list[torch.Tensor]]]
    attack_seconds: float
    forward: int
    backward: int
    info_keys: set[str]
    n_attacked: int


class AttackStep(L.LightningModule):
    """Attacks each test batch with `attack(model, x, y, eps=..., targeted=..., target=...)`
    for every eps value (no `eps` for an attack without one) and keeps every image's outcome.
    An attack that takes `info=` fills it with per-image diagnostics (e.g. lbfgs' final c); their
    medians (NaN entries, e.g. failed images, left out) become metrics `<key>_median`. An attack
    that takes `seeds=` (random starts) gets one per image, made of `seed` and the image's
    position in the eval subset, so its draw does not depend on the batch size or the CPU split.

    With a `surrogate` (a transfer attack) the adversarials are crafted on it and evaluated on
    `classifier`, which the attack never queries; the same attack is also run white-box on
    `classifier`, so that each image says whether the transfer fooled it where the white-box
    attack did not (`whitebox_success`), and whether it fooled the surrogate (`source_success`)."""

    def __init__(
        self,
        classifier: nn.Module,
        attack: Callable,
        eps: list[float | None],
        targeted: bool = False,
        target: str | int = "next",
        offsets: torch.Tensor | None = None,
        n_examples: int = 16,
        split: CoreSplit | None = None,
        seed: int = 0,
        surrogate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.surrogate = surrogate.eval().requires_grad_(False) if surrogate is not None else None
        self.attack, self.eps = attack, list(eps)
        self.targeted, self.target, self.n_examples = targeted, target, n_examples
        self.split = split  # on CPU: each batch as parallel single-threaded slices
        parameters = inspect.signature(attack).parameters
        self.takes_info, self.takes_seeds = "info" in parameters, "seeds" in parameters
        self.seed = seed
        self.passes = PassCounter(self.classifier)
        self.register_buffer("offsets", offsets, persistent=False)
        self.attack_seconds = 0.0
        self.n_attacked = 0  # images through the attack (DDP's padding attacks a few twice)
        # per eps: key → [(B,), ...]
        self.samples: list[defaultdict[str, list[torch.Tensor]]] = [defaultdict(list) for _ in self.eps]
        # per eps: key → [(b, ...), ...]
        self.examples: list[defaultdict[str, list[torch.Tensor]]] = [defaultdict(list) for _ in self.eps]
        self.n_kept = 0
        self.info_keys: set[str] = set()

    def _attack(self, model: nn.Module, x, y, target, seeds) -> Adversarials:
        kwargs = {"targeted": self.targeted, "target": target}
        if self.takes_seeds:
            kwargs["seeds"] = seeds
        info: dict[str, torch.Tensor] = {}
        if self.takes_info:
            kwargs["info"] = info
        if len(self.eps) > 1:
            adversarials = list(self.attack(model, x, y, eps=self.eps, **kwargs))
        elif self.eps[0] is None:
            adversarials = [self.attack(model, x, y, **kwargs)]
        else:
            adversarials = [self.attack(model, x, y, eps=self.eps[0], **kwargs)]
        return Adversarials(adversarials, info)

    def _logits(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        net = self.classifier if model is None else model

        def forward(xs):
            with torch.no_grad():  # worker threads do not inherit the test loop's no_grad
                return net(xs)

        return split_or_call(self.split, forward, x)

    def test_step(self, batch, batch_idx):
        raise_if_stopped()
        x, y, position = batch  # (B, C, H, W) in [0, 1], (B,), (B,)
        clean_logits = self._logits(x)
        target = (
            choose_targets(self.target, y, clean_logits, self.offsets[position]) if self.targeted else None
        )
        sync(x.device)
        start = time.perf_counter()
        self.passes.counting = True
        seeds = position.cpu() + self.seed * 1_000_000_007 if self.takes_seeds else None
        crafted_on = self.classifier if self.surrogate is None else self.surrogate
        generated: Adversarials = split_or_call(
            self.split, functools.partial(self._attack, crafted_on), x, y, target, seeds
        )
        self.passes.counting = False
        sync(x.device)
        self.attack_seconds += time.perf_counter() - start
        transfer = [{} for _ in generated.images]  # per eps: the transfer columns
        if self.surrogate is not None:
            whitebox = split_or_call(
                self.split, functools.partial(self._attack, self.classifier), x, y, target, seeds
            )
            for k, (x_adv, x_wb) in enumerate(zip(generated.images, whitebox.images, strict=True)):
                fooled = per_sample(x, x_wb, y, clean_logits, self._logits(x_wb), target)["success"]
                source = succeeded(self._logits(x_adv, self.surrogate), y, self.targeted, target)
                transfer[k] = {"whitebox_success": fooled, "source_success": source}
        self.n_attacked += len(x)
        info = generated.info
        self.info_keys.update(info)

        keep = min(self.n_examples - self.n_kept, len(x))
        for k, x_adv in enumerate(generated.images):
            outcome = {
                **per_sample(x, x_adv, y, clean_logits, self._logits(x_adv), target),
                **info,
                **transfer[k],
                "y": y,
                "position": position,
                **({} if target is None else {"target": target}),
            }
            for key, value in outcome.items():
                self.samples[k][key].append(value.cpu())
            if keep > 0:
                shown = {"x": x, "x_adv": x_adv, **outcome}
                for key, value in shown.items():
                    self.examples[k][key].append(value[:keep].detach().cpu())
        self.n_kept += max(keep, 0)

    def on_test_epoch_end(self) -> None:
        """Under DDP each rank attacked its share of the images: gather everything on every rank
        (the attack time is the slowest rank's, passes add up)."""
        if self.trainer.world_size == 1:
            return
        mine = Share(
            self.samples,
            self.examples,
            self.attack_seconds,
            self.passes.forward,
            self.passes.backward,
            self.info_keys,
            self.n_attacked,
        )
        ranks: list[Share] = [mine] * self.trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
        for k in range(len(self.eps)):
            self.samples[k] = defaultdict(
                list, {key: [p for r in ranks for p in r.samples[k][key]] for key in ranks[0].samples[k]}
            )
            self.examples[k] = defaultdict(
                list, {key: [p for r in ranks for p in r.examples[k][key]] for key in ranks[0].examples[k]}
            )
        self.attack_seconds = max(r.attack_seconds for r in ranks)
        self.passes.forward = sum(r.forward for r in ranks)
        self.passes.backward = sum(r.backward for r in ranks)
        self.info_keys = set().union(*(r.info_keys for r in ranks))
        self.n_attacked = sum(r.n_attacked for r in ranks)

    def result(self) -> AttackResult:
        metrics, examples, outcomes = [], [], []
        for eps, samples, kept in zip(self.eps, self.samples, self.examples, strict=True):
            everything = _by_position({key: torch.cat(parts) for key, parts in samples.items()})
            outcomes.append(everything)
            summary = summarize(everything)
            n_images = len(everything["success"])
            if eps is not None:
                summary["eps"] = eps
            else:  # a minimal-perturbation attack: the norms it found
                summary.update(min_norm_summary(everything))
            summary.update(
                attack_seconds=self.attack_seconds,
                images_per_second=n_images / self.attack_seconds,
                forward_passes_per_image=self.passes.forward / self.n_attacked,
                backward_passes_per_image=self.passes.backward / self.n_attacked,
            )
            for key in self.info_keys - {BROKEN_BY, COMPONENT_SECONDS}:  # the ensemble's: a table
                summary[f"{key}_median"] = everything[key].float().nanmedian().item()  # NaN: none
            if "whitebox_success" in everything:
                summary.update(transfer_summary(everything))
            metrics.append(summary)
            shown = _by_position({key: torch.cat(parts) for key, parts in kept.items()})
            examples.append({key: value[: self.n_examples] for key, value in shown.items()})
        return AttackResult(self.eps, metrics, examples, outcomes, self.split.workers if self.split else 1)


def transfer_summary(samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """A transfer attack's rates among the images the attacked model gets right when clean: it
    fooled the attacked model (`transfer_success_rate`), the surrogate it was crafted on
    (`source_success_rate`), and the white-box attack fooled the attacked model
    (`whitebox_success_rate`); `transfer_beats_whitebox`: images fooled by the transfer only."""
    correct = samples["clean_correct"]
    n = int(correct.sum())

    def rate(hits: torch.Tensor) -> float:
        return int((hits & correct).sum()) / n if n else float("nan")

    return {
        "transfer_success_rate": rate(samples["success"]),
        "source_success_rate": rate(samples["source_success"]),
        "whitebox_success_rate": rate(samples["whitebox_success"]),
        "transfer_beats_whitebox": float((samples["success"] & ~samples["whitebox_success"]).sum()),
    }


def _by_position(outcomes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every image once, in eval-subset order (DDP's sampler pads ranks with repeated images)."""
    position = outcomes["position"]
    order = position.argsort(stable=True)
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = position[order][1:] != position[order][:-1]
    return {key: value[order[first]] for key, value in outcomes.items()}


def run_attack(
    cfg: DictConfig, classifier: nn.Module, eval_set: Dataset, surrogate: nn.Module | None = None
) -> AttackResult:
    """Attack every image of `eval_set` (image, label, position) as `cfg.attack` says (crafted on
    `surrogate` if given: a transfer attack)."""
    trainer = lightning_trainer(cfg, inference_mode=False)  # attacks need gradients
    device = trainer.strategy.root_device
    workers = cpu_workers(cfg.cpu_workers) if device.type == "cpu" else 1
    split = CoreSplit(workers) if workers > 1 else None
    classifier = attacked_model(classifier, cfg.fast_cpu_model, device)
    if surrogate is not None:
        surrogate = attacked_model(surrogate, cfg.fast_cpu_model, device)
    step = AttackStep(
        classifier,
        attack_fn(cfg.attack),
        eps_values(cfg),
        targeted=cfg.attack.targeted,
        target=cfg.attack.target,
        # the eval sets are sized (TensorDataset or Subset)
        offsets=random_offsets(len(cast(Sized, eval_set)), cfg.data.num_classes, cfg.seed),
        n_examples=cfg.attack.n_examples,
        split=split,
        seed=cfg.seed,
        surrogate=surrogate,
    )
    try:
        trainer.test(step, DataLoader(eval_set, batch_size=cfg.attack.batch_size), verbose=False)
    finally:
        step.passes.remove()
        if split is not None:
            split.close()
    return step.result()
