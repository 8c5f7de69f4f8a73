"""Each attack as implemented here and by the peers.

Our attacks are given per batch (`ours(setup)(x_batch, y_batch) -> x_adv`), so the harness can
run them as one call per batch and as the attack step runs them on CPU (split over cores).
Every peer maker returns a function over all images, batching as its library is normally
used (ART batches internally, the others take one batch a call).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.attacks import fgsm, lbfgs, szegedy_sgd
from pipeline.bench.measure import over_batches
from pipeline.parallel import CoreSplit

Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Setup:
    model: nn.Module        # eval mode, parameters frozen, on `device`
    eps: float
    batch_size: int
    device: torch.device
    input_shape: tuple      # (C, H, W)
    num_classes: int
    split: CoreSplit | None = None  # how the attack step runs batches on this CPU, if split


def next_class(y: torch.Tensor, s: Setup) -> torch.Tensor:
    """The target of the targeted benchmarks: the next class."""
    return (y + 1) % s.num_classes


def ours_fgsm(s: Setup) -> Run:
    return lambda x, y: fgsm(s.model, x, y, s.eps)


def ours_lbfgs(s: Setup) -> Run:
    return lambda x, y: lbfgs(s.model, x, y, next_class(y, s))


def ours_szegedy_sgd(s: Setup) -> Run:
    return lambda x, y: szegedy_sgd(s.model, x, y, next_class(y, s))


def torchattacks_fgsm(s: Setup) -> Run:
    import torchattacks

    return over_batches(torchattacks.FGSM(s.model, eps=s.eps), s.batch_size)


def foolbox_fgsm(s: Setup) -> Run:
    import foolbox

    model = foolbox.PyTorchModel(s.model, bounds=(0, 1), device=s.device)
    attack = foolbox.attacks.FGSM()
    return over_batches(lambda x, y: attack(model, x, y, epsilons=s.eps)[1], s.batch_size)


def art_fgsm(s: Setup) -> Run:
    import logging

    import numpy as np
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)  # a log line per call otherwise
    classifier = PyTorchClassifier(
        model=s.model, loss=nn.CrossEntropyLoss(), input_shape=s.input_shape,
        nb_classes=s.num_classes, clip_values=(0.0, 1.0),
        device_type="gpu" if s.device.type == "cuda" else "cpu")
    attack = FastGradientMethod(classifier, norm=np.inf, eps=s.eps, batch_size=s.batch_size)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = attack.generate(x=x.cpu().numpy(), y=y.cpu().numpy())
        return torch.from_numpy(x_adv).to(s.device)
    return run


def _import_advertorch():
    # advertorch 0.2.3 imports torch.autograd.gradcheck.zero_gradients, removed from torch;
    # none of the attacks benchmarked here calls it
    gradcheck = sys.modules["torch.autograd.gradcheck"]
    if not hasattr(gradcheck, "zero_gradients"):
        gradcheck.zero_gradients = lambda x: None
    import advertorch.attacks

    return advertorch.attacks


def advertorch_fgsm(s: Setup) -> Run:
    attacks = _import_advertorch()
    attack = attacks.GradientSignAttack(s.model, eps=s.eps, clip_min=0.0, clip_max=1.0)
    return over_batches(attack.perturb, s.batch_size)


def advertorch_lbfgs(s: Setup) -> Run:
    # 9 values of c, 100 L-BFGS-B iterations each (its defaults); scipy solves the batch as one
    # float64 problem on the CPU
    attack = _import_advertorch().LBFGSAttack(s.model, num_classes=s.num_classes, targeted=True)
    return over_batches(lambda x, y: attack.perturb(x, next_class(y, s)), s.batch_size)


@dataclass
class Attack:
    ours: Callable[[Setup], Run]         # per batch
    floor_passes: int | None             # forward+backward passes per image it cannot avoid;
                                         # None: as many as ours was counted to make
    peers: dict[str, Callable[[Setup], Run]] = field(default_factory=dict)
    targeted: bool = False               # targeted attacks aim at next_class
    exact: bool = True                   # a correct peer gives the same adversarials


PEER_PACKAGES = {"torchattacks": "torchattacks", "foolbox": "foolbox",
                 "art": "adversarial-robustness-toolbox", "advertorch": "advertorch"}

ATTACKS = {
    "fgsm": Attack(ours_fgsm, floor_passes=1, peers={
        "torchattacks": torchattacks_fgsm, "foolbox": foolbox_fgsm,
        "art": art_fgsm, "advertorch": advertorch_fgsm}),
    "szegedy_sgd": Attack(ours_szegedy_sgd, floor_passes=100, targeted=True),  # its 100 steps
    "lbfgs": Attack(ours_lbfgs, floor_passes=None, targeted=True, exact=False,
                    peers={"advertorch": advertorch_lbfgs}),
}
