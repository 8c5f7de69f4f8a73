"""Each attack as implemented here and by the peers.

Our attacks are given per batch (`ours(setup)(x_batch, y_batch) -> x_adv`), so the harness can
run them as one call per batch and as the attack step runs them on CPU (split over cores).
Every peer maker returns a function over all images, batching as its library is normally
used (ART batches internally, the others take one batch a call).

Ours and every peer of an attack read the same hyper-parameters, `setup.params`: the attack's
`params` below with the overrides of conf/bench.yaml's `per_attack` (see `hyper_parameters`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.attacks import bim, cw_l2, deepfool, fgsm, lbfgs, mifgsm, pgd, szegedy_sgd
from pipeline.bench.measure import over_batches
from pipeline.errors import ConfigError
from pipeline.parallel import CoreSplit

Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Setup:
    model: nn.Module        # eval mode, parameters frozen, on `device`
    eps: float              # the attack's eps (the config's `eps` unless the attack has its own)
    batch_size: int
    device: torch.device
    input_shape: tuple      # (C, H, W)
    num_classes: int
    split: CoreSplit | None = None  # how the attack step runs batches on this CPU, if split
    params: dict = field(default_factory=dict)  # the attack's hyper-parameters, eps included


def next_class(y: torch.Tensor, s: Setup) -> torch.Tensor:
    """The target of the targeted benchmarks: the next class."""
    return (y + 1) % s.num_classes


# ---- ours -----------------------------------------------------------------------------------

def ours_fgsm(s: Setup) -> Run:
    return lambda x, y: fgsm(s.model, x, y, s.eps)


def ours_lbfgs(s: Setup) -> Run:
    return lambda x, y: lbfgs(s.model, x, y, next_class(y, s))


def ours_szegedy_sgd(s: Setup) -> Run:
    return lambda x, y: szegedy_sgd(s.model, x, y, next_class(y, s))


def ours_bim(s: Setup) -> Run:
    p = s.params
    return lambda x, y: bim(s.model, x, y, p["eps"], alpha=p["alpha"], steps=p["steps"])


def ours_pgd(norm: str) -> Callable[[Setup], Run]:
    def make(s: Setup) -> Run:
        p = s.params
        return lambda x, y: pgd(s.model, x, y, p["eps"], norm=norm, alpha=p["alpha"],
                                steps=p["steps"], random_start=p["random_start"])
    return make


def ours_mifgsm(s: Setup) -> Run:
    p = s.params
    return lambda x, y: mifgsm(s.model, x, y, p["eps"], alpha=p["alpha"], steps=p["steps"],
                               decay=p["decay"])


def ours_cw_l2(s: Setup) -> Run:
    p = s.params
    return lambda x, y: cw_l2(s.model, x, y, confidence=p["confidence"], c_init=p["c_init"],
                              binary_steps=p["binary_steps"], steps=p["steps"], lr=p["lr"],
                              abort_early=p["abort_early"])


def ours_deepfool(s: Setup) -> Run:
    p = s.params
    return lambda x, y: deepfool(s.model, x, y, steps=p["steps"], overshoot=p["overshoot"],
                                 candidates=p["candidates"])


# ---- torchattacks: one batch a call -----------------------------------------------------------

def torchattacks_fgsm(s: Setup) -> Run:
    import torchattacks

    return over_batches(torchattacks.FGSM(s.model, eps=s.eps), s.batch_size)


def torchattacks_bim(s: Setup) -> Run:
    import torchattacks

    p = s.params
    return over_batches(torchattacks.BIM(s.model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"]),
                        s.batch_size)


def torchattacks_pgd(norm: str) -> Callable[[Setup], Run]:
    def make(s: Setup) -> Run:
        import torchattacks

        p = s.params
        kind = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
        return over_batches(kind(s.model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"],
                                 random_start=p["random_start"]), s.batch_size)
    return make


def torchattacks_mifgsm(s: Setup) -> Run:
    import torchattacks

    p = s.params
    return over_batches(torchattacks.MIFGSM(s.model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"],
                                            decay=p["decay"]), s.batch_size)


TORCHATTACKS_CW_C = 1.0  # torchattacks' CW has no search over c: one Adam run at this c


def torchattacks_cw_l2(s: Setup) -> Run:
    import torchattacks

    p = s.params
    attack = torchattacks.CW(s.model, c=TORCHATTACKS_CW_C, kappa=p["confidence"], steps=p["steps"],
                             lr=p["lr"])
    return over_batches(attack, s.batch_size)


def torchattacks_deepfool(s: Setup) -> Run:
    import torchattacks

    p = s.params  # every class is a candidate: torchattacks has no top-k
    return over_batches(torchattacks.DeepFool(s.model, steps=p["steps"], overshoot=p["overshoot"]),
                        s.batch_size)


# ---- Foolbox 3: one batch a call ---------------------------------------------------------------

def _foolbox(s: Setup, attack, epsilons: float | None) -> Run:
    import foolbox

    model = foolbox.PyTorchModel(s.model, bounds=(0, 1), device=s.device)
    # the clipped adversarials: for a minimisation attack (epsilons=None) the same as the raw ones
    return over_batches(lambda x, y: attack(model, x, y, epsilons=epsilons)[1], s.batch_size)


def foolbox_fgsm(s: Setup) -> Run:
    import foolbox

    return _foolbox(s, foolbox.attacks.FGSM(), s.eps)


def foolbox_bim(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.LinfBasicIterativeAttack(abs_stepsize=p["alpha"], steps=p["steps"],
                                                      random_start=False)
    return _foolbox(s, attack, p["eps"])


def foolbox_pgd(norm: str) -> Callable[[Setup], Run]:
    def make(s: Setup) -> Run:
        import foolbox

        p = s.params
        kind = foolbox.attacks.LinfPGD if norm == "linf" else foolbox.attacks.L2PGD
        attack = kind(abs_stepsize=p["alpha"], steps=p["steps"], random_start=p["random_start"])
        return _foolbox(s, attack, p["eps"])
    return make


def foolbox_mifgsm(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.LinfMomentumIterativeFastGradientMethod(
        momentum=p["decay"], abs_stepsize=p["alpha"], steps=p["steps"], random_start=False)
    return _foolbox(s, attack, p["eps"])


def foolbox_cw_l2(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=p["binary_steps"], steps=p["steps"], stepsize=p["lr"],
        confidence=p["confidence"], initial_const=p["c_init"], abort_early=p["abort_early"])
    run = _foolbox(s, attack, None)

    def failures_as_x(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Foolbox returns an all-zero image where it found no adversarial; ours returns x there.
        # Left as zeros, a blank image the model does not read as y would count as a success
        x_adv = run(x, y)
        failed = (x_adv == 0).flatten(1).all(1)
        return torch.where(failed.view(-1, *[1] * (x.dim() - 1)), x, x_adv)
    return failures_as_x


def foolbox_deepfool(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.L2DeepFoolAttack(steps=p["steps"], candidates=p["candidates"],
                                              overshoot=p["overshoot"], loss="logits")
    return _foolbox(s, attack, None)


# ---- ART: batches internally, numpy in and out --------------------------------------------------

def _art(s: Setup, make_attack: Callable, with_labels: bool = True) -> Run:
    import logging

    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)  # a log line per call otherwise
    classifier = PyTorchClassifier(
        model=s.model, loss=nn.CrossEntropyLoss(), input_shape=s.input_shape,
        nb_classes=s.num_classes, clip_values=(0.0, 1.0),
        device_type="gpu" if s.device.type == "cuda" else "cpu")
    attack = make_attack(classifier)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        labels = y.cpu().numpy() if with_labels else None
        x_adv = attack.generate(x=x.cpu().numpy(), y=labels)
        return torch.from_numpy(x_adv).to(s.device)
    return run


def art_fgsm(s: Setup) -> Run:
    import numpy as np
    from art.attacks.evasion import FastGradientMethod

    return _art(s, lambda c: FastGradientMethod(c, norm=np.inf, eps=s.eps, batch_size=s.batch_size))


def art_bim(s: Setup) -> Run:
    from art.attacks.evasion import BasicIterativeMethod

    p = s.params
    return _art(s, lambda c: BasicIterativeMethod(c, eps=p["eps"], eps_step=p["alpha"], max_iter=p["steps"],
                                                  batch_size=s.batch_size, verbose=False))


def art_pgd(norm: str) -> Callable[[Setup], Run]:
    def make(s: Setup) -> Run:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescent

        p = s.params
        return _art(s, lambda c: ProjectedGradientDescent(
            c, norm=np.inf if norm == "linf" else 2, eps=p["eps"], eps_step=p["alpha"],
            max_iter=p["steps"], num_random_init=int(p["random_start"]), batch_size=s.batch_size,
            verbose=False))
    return make


def art_mifgsm(s: Setup) -> Run:
    import numpy as np
    from art.attacks.evasion import MomentumIterativeMethod

    p = s.params
    return _art(s, lambda c: MomentumIterativeMethod(
        c, norm=np.inf, eps=p["eps"], eps_step=p["alpha"], decay=p["decay"], max_iter=p["steps"],
        batch_size=s.batch_size, verbose=False))


def art_deepfool(s: Setup) -> Run:
    from art.attacks.evasion import DeepFool

    p = s.params  # ART's DeepFool takes no labels: it moves each image off its predicted class
    return _art(s, lambda c: DeepFool(c, max_iter=p["steps"], epsilon=p["overshoot"],
                                      nb_grads=p["candidates"] or s.num_classes,
                                      batch_size=s.batch_size, verbose=False),
                with_labels=False)


# ---- AdverTorch ------------------------------------------------------------------------------------

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


# ---- the registry ------------------------------------------------------------------------------

@dataclass
class Peer:
    make: Callable[[Setup], Run]
    exact: bool | None = None   # None: as the attack's `exact`
    note: str = ""              # how it differs from ours, shown after the library's name
    same_work: bool = True      # False: it does less or other work than ours (e.g. no search over
                                # c), so it is left out of "vs fastest peer"


@dataclass
class Attack:
    ours: Callable[[Setup], Run]         # per batch
    floor_passes: int | str | None       # forward+backward passes per image it cannot avoid;
                                         # "steps": params["steps"]; None: as many as ours was
                                         # counted to make
    peers: dict[str, Callable[[Setup], Run] | Peer] = field(default_factory=dict)
    targeted: bool = False               # targeted attacks aim at next_class
    exact: bool = True                   # a correct peer gives the same adversarials
    params: dict = field(default_factory=dict)  # hyper-parameters of ours and every peer; eps None:
                                                # the config's eps; alpha None: alpha_factor·eps/steps
    alpha_factor: float | None = None    # ours' default step size, given to every peer explicitly
    jacobian: bool = False               # each counted pass is a forward and the gradients of the
                                         # candidates' logits (one batched backward), not one gradient

    def floor(self, params: Mapping) -> int | None:
        return params["steps"] if self.floor_passes == "steps" else self.floor_passes

    def jacobian_rows(self, params: Mapping, num_classes: int) -> int | None:
        """Logit gradients per pass of a Jacobian floor: DeepFool's candidates but the first."""
        return min(params["candidates"] or num_classes, num_classes) - 1 if self.jacobian else None

    def peer(self, name: str) -> Peer:
        peer = self.peers[name]
        peer = peer if isinstance(peer, Peer) else Peer(peer)
        return Peer(peer.make, self.exact if peer.exact is None else peer.exact, peer.note, peer.same_work)


PEER_PACKAGES = {"torchattacks": "torchattacks", "foolbox": "foolbox",
                 "art": "adversarial-robustness-toolbox", "advertorch": "advertorch"}

LINF_ITERATIVE = {"eps": None, "alpha": None, "steps": 10}

ATTACKS = {
    "fgsm": Attack(ours_fgsm, floor_passes=1, params={"eps": None}, peers={
        "torchattacks": torchattacks_fgsm, "foolbox": foolbox_fgsm,
        "art": art_fgsm, "advertorch": advertorch_fgsm}),
    "szegedy_sgd": Attack(ours_szegedy_sgd, floor_passes=100, targeted=True),  # its 100 steps
    "lbfgs": Attack(ours_lbfgs, floor_passes=None, targeted=True, exact=False,
                    peers={"advertorch": advertorch_lbfgs}),
    # PGD starts from x (random_start False) in ours and every peer, as BIM and MI-FGSM do, so
    # that the adversarials can be compared image by image; with random_start True each library
    # draws its own starts and no peer is exact
    "bim": Attack(ours_bim, floor_passes="steps", params=dict(LINF_ITERATIVE), alpha_factor=1.0,
                  peers={"torchattacks": torchattacks_bim, "foolbox": foolbox_bim, "art": art_bim}),
    "pgd": Attack(ours_pgd("linf"), floor_passes="steps", alpha_factor=2.5,
                  params={**LINF_ITERATIVE, "steps": 40, "random_start": False},
                  peers={"torchattacks": torchattacks_pgd("linf"), "foolbox": foolbox_pgd("linf"),
                         "art": art_pgd("linf")}),
    "pgd_l2": Attack(ours_pgd("l2"), floor_passes="steps", alpha_factor=2.5,
                     params={"eps": 1.5, "alpha": None, "steps": 40, "random_start": False},
                     peers={"torchattacks": torchattacks_pgd("l2"), "foolbox": foolbox_pgd("l2"),
                            "art": art_pgd("l2")}),
    "mifgsm": Attack(ours_mifgsm, floor_passes="steps", params={**LINF_ITERATIVE, "decay": 1.0},
                     alpha_factor=1.0, peers={
                         "torchattacks": torchattacks_mifgsm,
                         "foolbox": Peer(foolbox_mifgsm, exact=False,
                                         note="momentum over gradient signs, not L1-normalised gradients"),
                         "art": art_mifgsm}),
    "cw_l2": Attack(ours_cw_l2, floor_passes=None, params={
        "confidence": 0.0, "c_init": 1e-3, "binary_steps": 9, "steps": 1000, "lr": 0.01,
        "abort_early": True}, peers={
            "torchattacks": Peer(torchattacks_cw_l2, exact=False, same_work=False,
                                 note=f"fixed c={TORCHATTACKS_CW_C:g}: no search over c"),
            # the same algorithm (Adam, the same search over c), but abort_early stops a whole
            # batch where ours stops each image, so the adversarials differ beyond rounding (with
            # abort_early false they agree to ~0.1% in mean L2, not bit for bit)
            "foolbox": Peer(foolbox_cw_l2, exact=False,
                            note="stops whole batches early; failures returned as x, not zeros"),
            # not ART's CarliniL2Method (1.20.1): a numpy line search (up to 10 extra forward passes
            # a step) in place of Adam, and c doubled, not ×10, after a failure, so 5 values from
            # 0.01 stop at 0.16, under the c ≈ 0.3 most images need. At c_init 1e-3, lr 0.01 it ran
            # 0.1 img/s (a busy 2-core VM) and fooled 0 of 50 images
        }),
    "deepfool": Attack(ours_deepfool, floor_passes=None, jacobian=True, params={
        "steps": 50, "overshoot": 0.02, "candidates": 10}, peers={
            # no 1e-4 push past the boundary and an overshoot that shrinks with the step: about
            # half the images of our CNN end exactly on a decision boundary (margin ≤ 2e-6), not
            # across it, after all 50 steps (torchattacks 3.5.1)
            "torchattacks": Peer(torchattacks_deepfool, exact=False,
                                 note="per image; overshoot on every step; all classes"),
            "foolbox": foolbox_deepfool,
            "art": Peer(art_deepfool, exact=False,
                        note="overshoot once at the end; no labels (predicted class)")}),
}

RUN_KEYS = ("n", "repeats")  # per_attack keys that are not hyper-parameters


def hyper_parameters(name: str, eps: float, overrides: Mapping) -> dict:
    """The hyper-parameters of attack `name`: its defaults with `overrides` (per_attack in
    conf/bench.yaml, less n and repeats), eps None → `eps`, alpha None → alpha_factor·eps/steps."""
    attack = ATTACKS[name]
    unknown = sorted(set(overrides) - set(attack.params) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"per_attack.{name}: unknown key(s) {unknown}; choose from "
                          f"{sorted([*attack.params, *RUN_KEYS])}")
    params = {**attack.params, **{k: v for k, v in overrides.items() if k not in RUN_KEYS}}
    if "eps" in params:
        params["eps"] = float(eps if params["eps"] is None else params["eps"])
    if params.get("alpha", 0) is None:
        params["alpha"] = attack.alpha_factor * params["eps"] / params["steps"]
    return params
