"""Attacks as pure torch functions: `attack(model, x, y, **params) -> x_adv`, images in [0,1]."""

from pipeline.attacks.cw import cw_l2
from pipeline.attacks.deepfool import deepfool
from pipeline.attacks.fgsm import fgsm
from pipeline.attacks.iterative import bim, mifgsm, pgd
from pipeline.attacks.lbfgs import lbfgs
from pipeline.attacks.szegedy_sgd import szegedy_sgd

__all__ = ["bim", "cw_l2", "deepfool", "fgsm", "lbfgs", "mifgsm", "pgd", "szegedy_sgd"]
