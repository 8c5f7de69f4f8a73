"""Adversarial training losses: each batch is attacked by a function of `pipeline.attacks` against
the current weights, and the model learns from the result.

- fgsm_rs (Wong, Rice & Kolter 2020): FGSM from a uniform random start in the eps ball, step
  alpha, projected back onto the ball: PGD with one step.
- n_fgsm (de Jorge et al. 2022): FGSM of step alpha from a uniform start in ±noise·eps, with no
  projection onto the eps ball (only onto [0,1]).
- pgd (Madry et al. 2018): `steps` PGD steps from a random start.
- trades (Zhang et al. 2019): CE(f(x), y) + beta·KL(f(x) ‖ f(x')), x' maximising the KL term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attacks import fgsm, pgd
from pipeline.attacks.iterative import PGD_STEP, pgd_kl
from pipeline.attacks.projection import random_point

FGSM_RS_STEP = 1.25  # Wong et al.: alpha = 1.25·eps


@dataclass
class Recipe:
    """An adversarial training recipe: the `train` config's keys that shape the training batches."""

    method: str
    eps: float
    alpha: float | None = None
    steps: int = 1
    noise: float = 2.0
    ramp_epochs: float = 0.0
    beta: float = 6.0
    init_std: float = 0.001
    step_scale: float = 1.0  # halved at each restart after catastrophic overfitting

    @classmethod
    def from_config(cls, train: dict) -> Recipe:
        keys = ("method", "eps", "alpha", "steps", "noise", "ramp_epochs", "beta", "init_std")
        return cls(**{key: train[key] for key in keys if key in train})

    @property
    def inner_steps(self) -> int:
        """Gradient steps of the inner attack per batch (`steps` for pgd and trades, else one)."""
        return self.steps if self.method in ("pgd", "trades") else 1

    def eps_at(self, epochs_done: float) -> float:
        """The training radius after `epochs_done` (fractional) epochs: the linear ramp-up."""
        if self.ramp_epochs <= 0:
            return self.eps
        return self.eps * min(1.0, epochs_done / self.ramp_epochs)

    def step_size(self, eps: float) -> float:
        """The inner attack's step at radius eps (alpha scales with the ramped eps)."""
        if self.alpha is not None:
            alpha = self.alpha * eps / self.eps if self.eps > 0 else 0.0
        elif self.method == "fgsm_rs":
            alpha = FGSM_RS_STEP * eps
        elif self.method == "n_fgsm":
            alpha = eps
        else:
            alpha = PGD_STEP * eps / self.steps
        return alpha * self.step_scale

    def adversarials(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        """The batch the model trains on (for trades: the x' of the KL term)."""
        alpha = self.step_size(eps)
        if self.method == "fgsm_rs":
            return pgd(net, x, y, eps, norm="linf", alpha=alpha, steps=1, random_start=True, restarts=1)
        if self.method == "pgd":
            return pgd(
                net, x, y, eps, norm="linf", alpha=alpha, steps=self.steps, random_start=True, restarts=1
            )
        if self.method == "n_fgsm":
            start = random_point(x, self.noise * eps, "linf", None, 0)
            return cast(torch.Tensor, fgsm(net, start, y, alpha))
        if self.method == "trades":
            return pgd_kl(net, x, y, eps, alpha=alpha, steps=self.steps, init_std=self.init_std)
        raise ValueError(f"unknown adversarial training method {self.method!r}")

    def loss(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch's training loss, the logits its accuracy is measured on)."""
        x_adv = self.adversarials(net, x, y, eps)
        if self.method == "trades":
            logits = net(x)
            return trades_loss(logits, net(x_adv), y, self.beta), logits
        logits = net(x_adv)
        return F.cross_entropy(logits, y), logits


def trades_loss(clean: torch.Tensor, adversarial: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(clean logits, y) + beta · mean over the batch of KL(softmax(clean) ‖ softmax(adversarial))."""
    kl = F.kl_div(
        F.log_softmax(adversarial, dim=1), F.log_softmax(clean, dim=1), reduction="batchmean", log_target=True
    )
    return F.cross_entropy(clean, y) + beta * kl
