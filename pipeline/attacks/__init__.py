"""Attacks as pure torch functions: `attack(model, x, y, **params) -> x_adv`, images in [0,1]."""

from pipeline.attacks.fgsm import fgsm
from pipeline.attacks.lbfgs import lbfgs
from pipeline.attacks.szegedy_sgd import szegedy_sgd

__all__ = ["fgsm", "lbfgs", "szegedy_sgd"]
