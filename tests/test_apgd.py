"""APGD and APGD-T (Croce & Hein 2020) against torchattacks on a trained CNN, what the peers do not
pin down (restarts, seeds, per-image independence, the early exit), and the invariants under
random models (hypothesis): finite, inside [0,1] and inside the eps ball."""

import pytest
import torch
import torchattacks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.attacks.apgd import apgd, apgd_t, checkpoints
from tests.conftest import attack_params
from tests.test_attack_properties import random_problem

N = 128  # images of tiny_cnn's 256 used against the peers
# Robust accuracy, ours vs torchattacks, may differ by this many of the N images: the algorithms are
# the same, but broken images leave our batch and a few float32 ties may go the other way. Measured
# (20 steps, 15 for APGD-T, 3 targets): identical counts in every case below, with torchattacks'
# own start (the same global draws) and with our per-image seeded starts alike.
TOLERANCE = 2
ROUNDING = 1e-6  # |fl(x + δ) − x| may exceed |δ| by an ulp


def _robust(model, x, y) -> int:
    return int((model(x).argmax(1) == y).sum())


def _in_threat_model(adv, x, eps, norm):
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + ROUNDING
    else:
        assert (delta.norm(dim=1) <= eps * (1 + ROUNDING) + ROUNDING).all()


def _peer_norm(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2"}[norm]


def test_checkpoints_follow_the_official_schedule():
    # int(0.22·100) = 22, then 3 shorter each time, down to int(0.06·100) = 6
    lengths = [length for _, length in checkpoints(100)]
    assert lengths[:7] == [22, 19, 16, 13, 10, 7, 6] and set(lengths[7:]) == {6}
    assert [i for i, _ in checkpoints(100)][:3] == [21, 40, 56]
    assert [i for i, _ in checkpoints(4)] == [0, 1, 2, 3]  # every interval at least one step


@pytest.mark.parametrize(
    "norm, eps, loss, seeded",
    [("linf", 0.08, "ce", False), ("linf", 0.08, "dlr", True), ("l2", 1.0, "ce", False)],
)
def test_apgd_agrees_with_torchattacks(tiny_cnn, norm, eps, loss, seeded):
    model, x, y = tiny_cnn
    x, y = x[:N], y[:N]
    # torchattacks seeds the global generator with `seed` and draws its starts from it, for the
    # images it attacks — as we do without `seeds`; with `seeds` our starts differ from theirs
    torch.manual_seed(0)
    seeds = torch.arange(N) if seeded else None
    ours = apgd(model, x, y, eps, **attack_params("apgd", norm=norm, loss=loss, steps=20), seeds=seeds)
    peer = torchattacks.APGD(
        model, norm=_peer_norm(norm), eps=eps, steps=20, n_restarts=1, seed=0, loss=loss, eot_iter=1, rho=0.75
    )
    theirs = peer(x, y)
    clean = model(x).argmax(1) == y
    assert abs(_robust(model, ours, y) - _robust(model, theirs, y)) <= TOLERANCE
    assert _robust(model, ours, y) < clean.sum() - 15  # it does attack
    assert torch.equal(ours[~clean], x[~clean])  # misclassified images are returned as they are
    _in_threat_model(ours, x, eps, norm)


def test_apgd_t_agrees_with_torchattacks(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:N], y[:N]
    torch.manual_seed(0)
    ours = apgd_t(model, x, y, 0.08, **attack_params("apgd_t", steps=15, n_targets=3))
    peer = torchattacks.APGDT(
        model, norm="Linf", eps=0.08, steps=15, n_restarts=1, seed=0, rho=0.75, n_classes=10
    )
    peer.n_target_classes = 3  # n_classes − 1 = 9 by default
    theirs = peer(x, y)
    clean = model(x).argmax(1) == y
    assert abs(_robust(model, ours, y) - _robust(model, theirs, y)) <= TOLERANCE
    assert _robust(model, ours, y) < clean.sum() - 15
    assert torch.equal(ours[~clean], x[~clean])
    _in_threat_model(ours, x, 0.08, "linf")


def test_targeted_apgd_aims_at_the_target(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:48], y[:48]
    target = (y + 1) % 10
    for loss in ("ce", "dlr"):
        adv = apgd(
            model,
            x,
            y,
            0.2,
            **attack_params("apgd", loss=loss, steps=10),
            targeted=True,
            target=target,
            seeds=torch.arange(48),
        )
        hit = model(adv).argmax(1) == target
        assert hit.sum() >= 5  # measured: 16 (ce), 9 (dlr) of 48
        untargeted = apgd(
            model, x, y, 0.2, **attack_params("apgd", loss=loss, steps=10), seeds=torch.arange(48)
        )
        assert hit.sum() > (model(untargeted).argmax(1) == target).sum()


def test_a_restart_never_makes_an_image_worse(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:64], y[:64]
    seeds = torch.arange(64)
    few_steps = attack_params("apgd", steps=4)
    one = apgd(model, x, y, 0.06, **few_steps, seeds=seeds)
    three = apgd(model, x, y, 0.06, **{**few_steps, "restarts": 3}, seeds=seeds)
    with torch.no_grad():
        logits_one, logits_three = model(one), model(three)
    loss_one = nn.functional.cross_entropy(logits_one, y, reduction="none")
    loss_three = nn.functional.cross_entropy(logits_three, y, reduction="none")
    won_one, won_three = logits_one.argmax(1) != y, logits_three.argmax(1) != y
    assert not (won_one & ~won_three).any()  # a success stays a success
    same = won_one == won_three
    assert (loss_three[same] >= loss_one[same] - 1e-6).all()  # otherwise the loss only rises
    assert (won_three & ~won_one).any() or (loss_three > loss_one + 1e-4).any()  # and restarts help


ATTACKS = {  # (model, x, y, seeds) → x_adv
    "apgd_ce": lambda m, x, y, s: apgd(m, x, y, 0.08, **attack_params("apgd", steps=8, restarts=2), seeds=s),
    "apgd_dlr_l2": lambda m, x, y, s: apgd(
        m, x, y, 1.0, **attack_params("apgd", norm="l2", loss="dlr", steps=8), seeds=s
    ),
    "apgd_targeted": lambda m, x, y, s: apgd(
        m, x, y, 0.1, **attack_params("apgd", steps=8), targeted=True, target=(y + 3) % 10, seeds=s
    ),
    "apgd_t": lambda m, x, y, s: apgd_t(
        m, x, y, 0.08, **attack_params("apgd_t", steps=8, n_targets=2), seeds=s
    ),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_seeded_runs_are_reproducible_and_per_image(tiny_cnn, name):
    model, x, y = tiny_cnn
    x, y = x[:24], y[:24]
    seeds = torch.arange(100, 124)
    attack = ATTACKS[name]
    a = attack(model, x, y, seeds)
    assert torch.equal(a, attack(model, x, y, seeds))
    assert not torch.equal(a, attack(model, x, y, seeds + 1))
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(attack(model, x[order], y[order], seeds[order]), a[order], atol=1e-6)
    for i in (0, 7, 19):  # an image alone: the same result as in the batch
        assert torch.allclose(
            attack(model, x[i : i + 1], y[i : i + 1], seeds[i : i + 1]), a[i : i + 1], atol=1e-6
        )


class _Counting(nn.Module):
    """The model, recording the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, z):
        self.sizes.append(len(z))
        return self.model(z)


def test_broken_images_leave_the_batch_and_keep_their_first_success(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:64], y[:64]
    counting = _Counting(model)
    adv = apgd(counting, x, y, 0.1, **attack_params("apgd", steps=10), seeds=torch.arange(64))
    clean = model(x).argmax(1) == y
    sizes = counting.sizes[1:]  # after the clean pass: the start, then one pass per step
    assert len(sizes) <= 11 and sizes[0] == clean.sum()
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[-1] < sizes[0]
    broken = clean & (model(adv).argmax(1) != y)
    # every image that left the batch did so because it was broken, with its successful point
    assert sizes[0] - min(sizes) <= broken.sum()
    assert torch.equal(
        apgd(model, x, y, 0.1, **attack_params("apgd", steps=10, eot_iter=2), seeds=torch.arange(64)), adv
    )


def test_bad_arguments_are_refused(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:4], y[:4]
    with pytest.raises(ValueError, match="untargeted"):
        apgd_t(model, x, y, 0.1, **attack_params("apgd_t", steps=2), targeted=True, target=(y + 1) % 10)
    with pytest.raises(ValueError, match="target"):
        apgd(model, x, y, 0.1, **attack_params("apgd", steps=2), targeted=True)
    with pytest.raises(ValueError, match="loss"):
        apgd(model, x, y, 0.1, **attack_params("apgd", steps=2, loss="cw"))
    with pytest.raises(ValueError, match="norm"):
        apgd(model, x, y, 0.1, **attack_params("apgd", steps=2, norm="l1"))
    both = apgd(model, x, y, [0.05, 0.1], **attack_params("apgd", steps=2), seeds=torch.arange(4))
    assert len(both) == 2 and torch.equal(
        both[1], apgd(model, x, y, 0.1, **attack_params("apgd", steps=2), seeds=torch.arange(4))
    )


# invariants under random models (hypothesis), as in tests/test_attack_properties.py
PROPERTY_ATTACKS = {  # (model, x, y, eps, norm, targeted, target, seeds) → x_adv
    "apgd_ce": lambda m, x, y, e, n, t, g, s: apgd(
        m, x, y, e, **attack_params("apgd", norm=n, steps=4, restarts=2), targeted=t, target=g, seeds=s
    ),
    "apgd_dlr": lambda m, x, y, e, n, t, g, s: apgd(
        m,
        x,
        y,
        e,
        **attack_params("apgd", norm=n, loss="dlr", steps=4, eot_iter=2),
        targeted=t,
        target=g,
        seeds=s,
    ),
    "apgd_t": lambda m, x, y, e, n, t, g, s: apgd_t(
        m, x, y, e, **attack_params("apgd_t", norm=n, steps=4), seeds=s
    ),
}

cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.integers(1, 6),
        "classes": st.integers(2, 5),  # DLR's 3rd and 4th logits do not exist below 4 classes
        "conv": st.booleans(),
        "targeted": st.booleans(),
        "saturated": st.booleans(),  # images of only 0s and 1s: the box binds everywhere
    }
)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", sorted(PROPERTY_ATTACKS))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, scale=st.floats(0.0, 1.0))
def test_apgd_stays_in_the_box_and_the_ball(name, norm, case, scale):
    model, x, y, target = random_problem(case)
    eps = scale if norm == "linf" else 8 * scale
    targeted = case["targeted"] and name != "apgd_t"
    adv = PROPERTY_ATTACKS[name](
        model, x, y, eps, norm, targeted, target if targeted else None, torch.arange(len(x))
    )
    _in_threat_model(adv, x, eps, norm)
