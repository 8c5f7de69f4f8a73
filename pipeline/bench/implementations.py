"""Each attack as implemented here and by the peers.

Our attacks are given per batch (`ours(setup)(x_batch, y_batch) -> x_adv`), so the harness can
run them as one call per batch and as the attack step runs them on CPU (split over cores).
Every peer maker returns a function over all images, batching as its library is normally
used (ART batches internally, the others take one batch a call).

Each attack runs as `per_attack.<name>` of conf/bench.yaml describes it: conf/attack/<name>.yaml
with the few settings the benchmark deliberately runs differently (see `configure`). Ours gets
every hyper-parameter of that config; the peers get `setup.params`, the ones they share with ours
(an attack's `shared` below), the same values for every implementation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.attacks.iterative import BIM_STEP, PGD_STEP, default_alpha
from pipeline.attacks.projection import per_image
from pipeline.attacks.targets import next_class
from pipeline.bench.measure import over_batches
from pipeline.config import attack_function, attack_kwargs
from pipeline.parallel import CoreSplit

Run = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Setup:
    model: nn.Module  # eval mode, parameters frozen, on `device`: what the peers attack
    eps: float  # the attack's eps (the config's `eps` unless the attack has its own)
    batch_size: int
    device: torch.device
    input_shape: tuple  # (C, H, W)
    num_classes: int
    split: CoreSplit | None = None  # how the attack step runs batches on this CPU, if split
    params: dict = field(default_factory=dict)  # the hyper-parameters ours shares with every peer,
    # eps included
    hyper: dict = field(default_factory=dict)  # every hyper-parameter of ours (the shared ones as
    # in params), eps left out
    attack: Callable | None = None  # our attack function
    targeted: bool = False  # targeted attacks aim at next_class
    fast_model: nn.Module | None = None  # `model` as the attack step attacks it on a CPU
    # (fast_cpu_model: pipeline.models.fast.for_cpu_attacks); None: `model` itself

    @property
    def our_model(self) -> nn.Module:
        """The model ours and its floor attack."""
        return self.model if self.fast_model is None else self.fast_model


# ---- ours -----------------------------------------------------------------------------------


def ours(s: Setup) -> Run:
    """Our attack on a batch, with every hyper-parameter of its config."""
    eps = {"eps": s.params["eps"]} if "eps" in s.params else {}

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = next_class(y, s.num_classes) if s.targeted else None
        assert s.attack is not None  # the bench sets our attack function before running ours
        return s.attack(s.our_model, x, y, **eps, **s.hyper, targeted=s.targeted, target=target)

    return run


# ---- torchattacks: one batch a call -----------------------------------------------------------


def torchattacks_fgsm(s: Setup) -> Run:
    import torchattacks

    return over_batches(torchattacks.FGSM(s.model, eps=s.eps), s.batch_size)


def torchattacks_bim(s: Setup) -> Run:
    import torchattacks

    p = s.params
    return over_batches(
        torchattacks.BIM(s.model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"]), s.batch_size
    )


def torchattacks_pgd(s: Setup) -> Run:
    import torchattacks

    p = s.params
    kind = torchattacks.PGD if s.hyper["norm"] == "linf" else torchattacks.PGDL2
    return over_batches(
        kind(s.model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"]),
        s.batch_size,
    )


def torchattacks_mifgsm(s: Setup) -> Run:
    import torchattacks

    p = s.params
    return over_batches(
        torchattacks.MIFGSM(s.model, eps=p["eps"], alpha=p["alpha"], steps=p["steps"], decay=p["decay"]),
        s.batch_size,
    )


TA_NORM = {"linf": "Linf", "l2": "L2"}


def torchattacks_apgd(s: Setup) -> Run:
    import torchattacks

    h = s.hyper
    attack = torchattacks.APGD(
        s.model,
        norm=TA_NORM[h["norm"]],
        eps=s.eps,
        steps=h["steps"],  # explicit: torchattacks' default is 10, the original's 100
        n_restarts=h["restarts"],
        loss=h["loss"],
        rho=h["rho"],
        eot_iter=h["eot_iter"],
        seed=0,
    )
    return over_batches(attack, s.batch_size)


def torchattacks_square(s: Setup) -> Run:
    import torchattacks

    h = s.hyper
    attack = torchattacks.Square(
        s.model,
        norm=TA_NORM[h["norm"]],
        eps=s.eps,
        n_queries=h["queries"],
        n_restarts=h["restarts"],
        p_init=h["p_init"],
        loss="margin",
        resc_schedule=False,  # the original's schedule (torchattacks' default rescales it)
        seed=0,
    )
    return over_batches(attack, s.batch_size)


def torchattacks_autoattack(s: Setup) -> Run:
    """torchattacks' AutoAttack (standard) with its APGD, APGD-T and FAB forced to the original's
    100 iterations (its constructor leaves them at 10: torchattacks issue #196) and seed 0."""
    import torchattacks

    attack = torchattacks.AutoAttack(
        s.model, norm=TA_NORM[s.hyper["norm"]], eps=s.eps, version="standard", n_classes=s.num_classes, seed=0
    )
    for component in attack._autoattack.attacks:
        if hasattr(component, "steps"):
            component.steps = AUTOATTACK_STEPS
    return over_batches(attack, s.batch_size)


AUTOATTACK_STEPS = 100  # the original AutoAttack's iterations for APGD, APGD-T and FAB-T
TORCHATTACKS_CW_C = 1.0  # torchattacks' CW has no search over c: one Adam run at this c


def torchattacks_cw_l2(s: Setup) -> Run:
    import torchattacks

    p = s.params
    attack = torchattacks.CW(
        s.model, c=TORCHATTACKS_CW_C, kappa=p["confidence"], steps=p["steps"], lr=p["lr"]
    )
    return over_batches(attack, s.batch_size)


def torchattacks_deepfool(s: Setup) -> Run:
    import torchattacks

    p = s.params  # every class is a candidate: torchattacks has no top-k
    return over_batches(
        torchattacks.DeepFool(s.model, steps=p["steps"], overshoot=p["overshoot"]), s.batch_size
    )


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
    attack = foolbox.attacks.LinfBasicIterativeAttack(
        abs_stepsize=p["alpha"], steps=p["steps"], random_start=False
    )
    return _foolbox(s, attack, p["eps"])


def foolbox_pgd(s: Setup) -> Run:
    import foolbox

    p = s.params
    kind = foolbox.attacks.LinfPGD if s.hyper["norm"] == "linf" else foolbox.attacks.L2PGD
    attack = kind(abs_stepsize=p["alpha"], steps=p["steps"], random_start=p["random_start"])
    return _foolbox(s, attack, p["eps"])


def foolbox_mifgsm(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.LinfMomentumIterativeFastGradientMethod(
        momentum=p["decay"], abs_stepsize=p["alpha"], steps=p["steps"], random_start=False
    )
    return _foolbox(s, attack, p["eps"])


def foolbox_cw_l2(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=p["binary_steps"],
        steps=p["steps"],
        stepsize=p["lr"],
        confidence=p["confidence"],
        initial_const=p["c_init"],
        abort_early=p["abort_early"],
    )
    run = _foolbox(s, attack, None)

    def failures_as_x(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Foolbox returns an all-zero image where it found no adversarial; ours returns x there.
        # Left as zeros, a blank image the model does not read as y would count as a success
        x_adv = run(x, y)
        failed = (x_adv == 0).flatten(1).all(1)
        return torch.where(per_image(failed, x), x, x_adv)

    return failures_as_x


def foolbox_deepfool(s: Setup) -> Run:
    import foolbox

    p = s.params
    attack = foolbox.attacks.L2DeepFoolAttack(
        steps=p["steps"], candidates=p["candidates"], overshoot=p["overshoot"], loss="logits"
    )
    return _foolbox(s, attack, None)


# ---- ART: batches internally, numpy in and out --------------------------------------------------


def _art(s: Setup, make_attack: Callable, with_labels: bool = True) -> Run:
    import logging

    from art.estimators.classification import PyTorchClassifier

    logging.getLogger("art").setLevel(logging.WARNING)  # a log line per call otherwise
    classifier = PyTorchClassifier(
        model=s.model,
        loss=nn.CrossEntropyLoss(),
        input_shape=s.input_shape,
        nb_classes=s.num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if s.device.type == "cuda" else "cpu",
    )
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
    return _art(
        s,
        lambda c: BasicIterativeMethod(
            c, eps=p["eps"], eps_step=p["alpha"], max_iter=p["steps"], batch_size=s.batch_size, verbose=False
        ),
    )


def art_pgd(s: Setup) -> Run:
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent

    p = s.params
    return _art(
        s,
        lambda c: ProjectedGradientDescent(
            c,
            norm=np.inf if s.hyper["norm"] == "linf" else 2,
            eps=p["eps"],
            eps_step=p["alpha"],
            max_iter=p["steps"],
            num_random_init=int(p["random_start"]),
            batch_size=s.batch_size,
            verbose=False,
        ),
    )


def art_mifgsm(s: Setup) -> Run:
    import numpy as np
    from art.attacks.evasion import MomentumIterativeMethod

    p = s.params
    return _art(
        s,
        lambda c: MomentumIterativeMethod(
            c,
            norm=np.inf,
            eps=p["eps"],
            eps_step=p["alpha"],
            decay=p["decay"],
            max_iter=p["steps"],
            batch_size=s.batch_size,
            verbose=False,
        ),
    )


def art_deepfool(s: Setup) -> Run:
    from art.attacks.evasion import DeepFool

    p = s.params  # ART's DeepFool takes no labels: it moves each image off its predicted class
    return _art(
        s,
        lambda c: DeepFool(
            c,
            max_iter=p["steps"],
            epsilon=p["overshoot"],
            nb_grads=p["candidates"] or s.num_classes,
            batch_size=s.batch_size,
            verbose=False,
        ),
        with_labels=False,
    )


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
    attack = _import_advertorch().LBFGSAttack(s.model, num_classes=s.num_classes, targeted=s.targeted)
    return over_batches(
        lambda x, y: attack.perturb(x, next_class(y, s.num_classes) if s.targeted else y), s.batch_size
    )


# ---- the registry ------------------------------------------------------------------------------


@dataclass
class Peer:
    make: Callable[[Setup], Run]
    exact: bool | None = None  # None: as the attack's `exact`
    note: str = ""  # how it differs from ours, shown after the library's name
    same_work: bool = True  # False: it does less or other work than ours (e.g. no search over
    # c), so it is left out of "vs fastest peer"


@dataclass
class Attack:
    floor_passes: int | str | None  # forward+backward passes per image it cannot avoid; a
    # hyper-parameter's name ("steps", "queries"): its value; None: as many as ours was counted
    # to make
    forward_only: bool = False  # the floor's passes are forward passes (a black-box attack)
    peers: Mapping[str, Callable[[Setup], Run] | Peer] = field(default_factory=dict)
    exact: bool = True  # a correct peer gives the same adversarials
    shared: tuple[str, ...] = ()  # the hyper-parameters every peer is given too (eps: the
    # attack config's eps; alpha None: alpha_factor·eps/steps)
    alpha_factor: float | None = None  # ours' default step size, given to every peer explicitly
    jacobian: bool = False  # each counted pass is a forward and the gradients of the
    # candidates' logits (one batched backward), not one gradient

    def floor(self, hyper: Mapping) -> int | None:
        return hyper[self.floor_passes] if isinstance(self.floor_passes, str) else self.floor_passes

    def jacobian_rows(self, hyper: Mapping, num_classes: int) -> int | None:
        """Logit gradients per pass of a Jacobian floor: DeepFool's candidates but the first."""
        return min(hyper["candidates"] or num_classes, num_classes) - 1 if self.jacobian else None

    def peer(self, name: str) -> Peer:
        peer = self.peers[name]
        peer = peer if isinstance(peer, Peer) else Peer(peer)
        return Peer(peer.make, self.exact if peer.exact is None else peer.exact, peer.note, peer.same_work)


PEER_PACKAGES = {
    "torchattacks": "torchattacks",
    "foolbox": "foolbox",
    "art": "adversarial-robustness-toolbox",
    "advertorch": "advertorch",
}

LINF_ITERATIVE = ("eps", "alpha", "steps")
PGD_PEERS = {"torchattacks": torchattacks_pgd, "foolbox": foolbox_pgd, "art": art_pgd}

ATTACKS = {
    "fgsm": Attack(
        floor_passes=1,
        shared=("eps",),
        peers={
            "torchattacks": torchattacks_fgsm,
            "foolbox": foolbox_fgsm,
            "art": art_fgsm,
            "advertorch": advertorch_fgsm,
        },
    ),
    "szegedy_sgd": Attack(floor_passes="steps"),  # one fwd+bwd per step
    "lbfgs": Attack(floor_passes=None, exact=False, peers={"advertorch": advertorch_lbfgs}),
    # PGD starts from x (random_start false in conf/bench.yaml) in ours and every peer, as BIM and
    # MI-FGSM do, so that the adversarials can be compared image by image; with random_start true
    # each library draws its own starts and no peer is exact
    "bim": Attack(
        floor_passes="steps",
        shared=LINF_ITERATIVE,
        alpha_factor=BIM_STEP,
        peers={"torchattacks": torchattacks_bim, "foolbox": foolbox_bim, "art": art_bim},
    ),
    "pgd": Attack(
        floor_passes="steps", alpha_factor=PGD_STEP, shared=(*LINF_ITERATIVE, "random_start"), peers=PGD_PEERS
    ),
    "pgd_l2": Attack(
        floor_passes="steps", alpha_factor=PGD_STEP, shared=(*LINF_ITERATIVE, "random_start"), peers=PGD_PEERS
    ),
    "mifgsm": Attack(
        floor_passes="steps",
        shared=(*LINF_ITERATIVE, "decay"),
        alpha_factor=BIM_STEP,
        peers={
            "torchattacks": torchattacks_mifgsm,
            "foolbox": Peer(
                foolbox_mifgsm, exact=False, note="momentum over gradient signs, not L1-normalised gradients"
            ),
            "art": art_mifgsm,
        },
    ),
    "cw_l2": Attack(
        floor_passes=None,
        shared=("confidence", "c_init", "binary_steps", "steps", "lr", "abort_early"),
        peers={
            "torchattacks": Peer(
                torchattacks_cw_l2,
                exact=False,
                same_work=False,
                note=f"fixed c={TORCHATTACKS_CW_C:g}: no search over c",
            ),
            # the same algorithm (Adam, the same search over c), but abort_early stops a whole
            # batch where ours stops each image, so the adversarials differ beyond rounding (with
            # abort_early false they agree to ~0.1% in mean L2, not bit for bit)
            "foolbox": Peer(
                foolbox_cw_l2,
                exact=False,
                note="stops whole batches early; failures returned as x, not zeros",
            ),
            # not ART's CarliniL2Method (1.20.1): a numpy line search (up to 10 extra forward passes
            # a step) in place of Adam, and c doubled, not ×10, after a failure, so 5 values from
            # 0.01 stop at 0.16, under the c ≈ 0.3 most images need. At c_init 1e-3, lr 0.01 it ran
            # 0.1 img/s (a busy 2-core VM) and fooled 0 of 50 images
        },
    ),
    "deepfool": Attack(
        floor_passes=None,
        jacobian=True,
        shared=("steps", "overshoot", "candidates"),
        peers={
            # no 1e-4 push past the boundary and an overshoot that shrinks with the step: about
            # half the images of our CNN end exactly on a decision boundary (margin ≤ 2e-6), not
            # across it, after all 50 steps (torchattacks 3.5.1)
            "torchattacks": Peer(
                torchattacks_deepfool, exact=False, note="per image; overshoot on every step; all classes"
            ),
            "foolbox": foolbox_deepfool,
            "art": Peer(
                art_deepfool, exact=False, note="overshoot once at the end; no labels (predicted class)"
            ),
        },
    ),
}

ATTACKS |= {
    # random starts and per-image seeds: no peer is exact; early exit on images already fooled
    # lets ours beat a floor of one fwd+bwd per step
    "apgd": Attack(
        floor_passes="steps", exact=False, shared=("eps",), peers={"torchattacks": torchattacks_apgd}
    ),
    "square": Attack(
        floor_passes="queries",
        forward_only=True,
        exact=False,
        shared=("eps",),
        peers={"torchattacks": torchattacks_square},
    ),
    "autoattack": Attack(
        floor_passes=None,
        exact=False,
        shared=("eps",),
        peers={
            "torchattacks": Peer(
                torchattacks_autoattack,
                note=f"APGD, APGD-T and FAB-T forced to {AUTOATTACK_STEPS} iterations",
            )
        },
    ),
}

RUN_KEYS = ("n", "repeats")  # per_attack keys of the benchmark itself, not of the attack


def hyper_parameters(name: str, attack_cfg: DictConfig | Mapping) -> dict:
    """The hyper-parameters attack `name` gives ours and every peer alike: its `shared` keys of
    `attack_cfg` (per_attack.<name> of conf/bench.yaml), eps as a float, alpha None →
    alpha_factor·eps/steps. A key the attack's function does not take is a ConfigError."""
    attack = ATTACKS[name]
    kwargs = attack_kwargs(attack_cfg, f"per_attack.{name}", RUN_KEYS)
    params: dict[str, Any] = {
        key: float(attack_cfg["eps"]) if key == "eps" else kwargs[key] for key in attack.shared
    }
    if params.get("alpha", 0) is None:
        assert attack.alpha_factor is not None  # every attack that shares alpha has an alpha_factor
        params["alpha"] = default_alpha(attack.alpha_factor, params["eps"], params["steps"])
    return params


def configure(setup: Setup, name: str, attack_cfg: DictConfig | Mapping) -> Setup:
    """`setup` for attack `name` as `attack_cfg` (per_attack.<name> of conf/bench.yaml) has it: the
    shared hyper-parameters for every implementation, the rest of its config for ours."""
    params = hyper_parameters(name, attack_cfg)
    hyper = {
        **attack_kwargs(attack_cfg, f"per_attack.{name}", RUN_KEYS),
        **{key: value for key, value in params.items() if key != "eps"},
    }
    return replace(
        setup,
        eps=params.get("eps", setup.eps),
        params=params,
        hyper=hyper,
        attack=attack_function(attack_cfg, f"per_attack.{name}"),
        targeted=bool(attack_cfg["targeted"]),
    )
