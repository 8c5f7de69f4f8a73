"""Attacks as pure torch functions: `attack(model, x, y, **params) -> x_adv`, images in [0,1]."""

from pipeline.attacks.fgsm import fgsm

__all__ = ["fgsm"]
