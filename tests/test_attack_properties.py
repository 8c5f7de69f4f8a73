"""Invariants of every attack under random models, images, eps and targets (hypothesis): outputs
are finite, inside [0,1] and inside the eps ball (up to float32 rounding of x + δ − x)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.attacks import bim, cw_l2, deepfool, fgsm, lbfgs, mifgsm, pgd, szegedy_sgd
from tests.conftest import attack_params

ROUNDING = 1e-6  # |fl(x + δ) − x| may exceed |δ| by an ulp

BUDGET_ATTACKS = {  # eps-budget attacks: (model, x, y, eps, targeted, target, seeds) → x_adv
    "fgsm": lambda m, x, y, e, t, g, s: fgsm(m, x, y, e, targeted=t, target=g),
    "bim": lambda m, x, y, e, t, g, s: bim(m, x, y, e, **attack_params("bim", steps=4), targeted=t, target=g),
    "pgd": lambda m, x, y, e, t, g, s: pgd(
        m, x, y, e, **attack_params("pgd", steps=4, restarts=2), targeted=t, target=g, seeds=s
    ),
    "mifgsm": lambda m, x, y, e, t, g, s: mifgsm(
        m, x, y, e, **attack_params("mifgsm", steps=4), targeted=t, target=g
    ),
}
MINIMAL_ATTACKS = {  # no budget: (model, x, y, targeted, target) → x_adv
    "cw_l2": lambda m, x, y, t, g: cw_l2(
        m, x, y, targeted=t, target=g, **attack_params("cw_l2", binary_steps=2, steps=10)
    ),
    "deepfool": lambda m, x, y, t, g: deepfool(m, x, y, **attack_params("deepfool", steps=10)),
    "lbfgs": lambda m, x, y, t, g: lbfgs(
        m, x, y, target=g, targeted=t, **attack_params("lbfgs", c_steps=2, max_iter=5)
    ),
    "szegedy_sgd": lambda m, x, y, t, g: szegedy_sgd(
        m, x, y, target=g, targeted=t, **attack_params("szegedy_sgd", steps=5)
    ),
}

cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.integers(1, 6),
        "classes": st.integers(2, 5),
        "conv": st.booleans(),
        "targeted": st.booleans(),
        "saturated": st.booleans(),  # images of only 0s and 1s: the box binds everywhere
    }
)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_problem(case):
    """A random small model (conv or MLP, 2..5 classes), images, labels and a target per image
    other than the label, from a hypothesis case (seed, batch, classes, conv, saturated)."""
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    k = case["classes"]
    if case["conv"]:
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, k))
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, k))
    model.eval().requires_grad_(False)
    n = case["batch"]
    x = torch.rand(n, 1, 6, 6, generator=g)
    if case["saturated"]:
        x = x.round()
    y = torch.randint(0, k, (n,), generator=g)
    target = (y + torch.randint(1, k, (n,), generator=g)) % k
    return model, x, y, target


def _problem(case):
    model, x, y, target = random_problem(case)
    return model, x, y, case["targeted"], target if case["targeted"] else None


def _check_box(x_adv):
    assert torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", sorted(BUDGET_ATTACKS))
@SETTINGS
@given(case=cases, eps=st.floats(0.0, 1.0))
def test_linf_attacks_stay_in_the_box_and_the_ball(name, case, eps):
    model, x, y, targeted, target = _problem(case)
    x_adv = BUDGET_ATTACKS[name](model, x, y, eps, targeted, target, torch.arange(len(x)))
    _check_box(x_adv)
    assert (x_adv - x).abs().max() <= eps + ROUNDING


@SETTINGS
@given(case=cases, eps=st.floats(0.0, 8.0))
def test_pgd_l2_stays_in_the_box_and_the_ball(case, eps):
    model, x, y, targeted, target = _problem(case)
    x_adv = pgd(
        model,
        x,
        y,
        eps,
        **attack_params("pgd_l2", steps=4, restarts=2),
        targeted=targeted,
        target=target,
        seeds=torch.arange(len(x)),
    )
    _check_box(x_adv)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps * (1 + ROUNDING) + ROUNDING).all()


@pytest.mark.parametrize("name", sorted(MINIMAL_ATTACKS))
@SETTINGS
@given(case=cases)
def test_minimal_perturbation_attacks_stay_in_the_box(name, case):
    model, x, y, targeted, target = _problem(case)
    if name == "deepfool":
        targeted, target = False, None
    _check_box(MINIMAL_ATTACKS[name](model, x, y, targeted, target))
