"""Attacks as pure torch functions: `attack(model, x, y, **params) -> x_adv`, images in [0,1].

Hyper-parameters are keyword-only and have no defaults here: their defaults are the flat keys of
conf/attack/<name>.yaml (`pipeline.config.attack_defaults(name)` reads them without Hydra, e.g.
`pgd(model, x, y, 0.1, **attack_defaults("pgd"))`). `targeted` is False unless given.
"""

from pipeline.attacks.cw import cw_l2
from pipeline.attacks.deepfool import deepfool
from pipeline.attacks.fgsm import fgsm
from pipeline.attacks.iterative import bim, mifgsm, pgd
from pipeline.attacks.lbfgs import lbfgs
from pipeline.attacks.szegedy_sgd import szegedy_sgd

__all__ = ["bim", "cw_l2", "deepfool", "fgsm", "lbfgs", "mifgsm", "pgd", "szegedy_sgd"]
