"""Attacks as pure torch functions: `attack(model, x, y, **params) -> x_adv`, images in [0,1].

Hyper-parameters are keyword-only and have no defaults here: their defaults are the flat keys of
conf/attack/<name>.yaml (`pipeline.config.attack_defaults(name)` reads them without Hydra, e.g.
`pgd(model, x, y, 0.1, **attack_defaults("pgd"))`). `targeted` is False unless given.
"""

from pipeline.attacks.apgd import apgd, apgd_t
from pipeline.attacks.cw import cw_l2
from pipeline.attacks.deepfool import deepfool
from pipeline.attacks.ensemble import autoattack
from pipeline.attacks.fab import fab
from pipeline.attacks.fgsm import fgsm
from pipeline.attacks.iterative import bim, mifgsm, pgd
from pipeline.attacks.lbfgs import lbfgs
from pipeline.attacks.square import square
from pipeline.attacks.szegedy_sgd import szegedy_sgd

__all__ = [
    "apgd",
    "apgd_t",
    "autoattack",
    "bim",
    "cw_l2",
    "deepfool",
    "fab",
    "fgsm",
    "lbfgs",
    "mifgsm",
    "pgd",
    "square",
    "szegedy_sgd",
]
