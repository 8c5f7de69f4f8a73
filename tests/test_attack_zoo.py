"""BIM, PGD, MI-FGSM, C&W L2 and DeepFool against torchattacks and Foolbox on a trained CNN, and
the semantics the peers do not pin down: restarts, per-image independence, seeded starts."""

import foolbox
import pytest
import torch
import torchattacks

from pipeline.attacks import bim, cw_l2, deepfool, mifgsm, pgd
from pipeline.attacks.iterative import _loss
from pipeline.attacks.losses import succeeded
from tests.conftest import attack_params


def _accuracy(model, x, y):
    return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_pgd_without_random_start_and_mifgsm_identical_to_torchattacks(tiny_cnn, eps):
    model, x, y = tiny_cnn
    ours = pgd(model, x, y, eps, **attack_params("pgd", alpha=0.02, steps=10, random_start=False))
    assert torch.equal(ours, torchattacks.PGD(model, eps=eps, alpha=0.02, steps=10, random_start=False)(x, y))
    assert _accuracy(model, ours, y) < _accuracy(model, x, y) - 0.2  # it does attack
    ours = mifgsm(model, x, y, eps, **attack_params("mifgsm", alpha=0.02, steps=10))
    assert torch.equal(ours, torchattacks.MIFGSM(model, eps=eps, alpha=0.02, steps=10)(x, y))


def test_bim_identical_to_torchattacks_up_to_rounding(tiny_cnn):
    # torchattacks projects with max/min of x ± eps; we clip δ: the same point up to one float32 ulp
    model, x, y = tiny_cnn
    ours = bim(model, x, y, 0.15, **attack_params("bim", alpha=0.02, steps=10))
    theirs = torchattacks.BIM(model, eps=0.15, alpha=0.02, steps=10)(x, y)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-7)
    assert torch.equal(model(ours).argmax(1), model(theirs).argmax(1))


def test_targeted_pgd_identical_to_torchattacks(tiny_cnn):
    model, x, y = tiny_cnn
    target = (y + 1) % 10
    attack = torchattacks.PGD(model, eps=0.2, alpha=0.02, steps=10, random_start=False)
    attack.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10)
    ours = pgd(
        model,
        x,
        y,
        0.2,
        **attack_params("pgd", alpha=0.02, steps=10, random_start=False),
        targeted=True,
        target=target,
    )
    assert torch.equal(ours, attack(x, y))
    assert (model(ours).argmax(1) == target).float().mean() > 0.2


def test_pgd_l2_agrees_with_torchattacks(tiny_cnn):
    # torchattacks averages the loss over the batch, we sum it: the L2-normalised steps differ in
    # the last bits and trajectories drift apart slightly; the outcome must not (tolerance: 1 image)
    model, x, y = tiny_cnn
    for eps in (1.0, 2.0):
        ours = pgd(model, x, y, eps, **attack_params("pgd_l2", alpha=0.2, steps=10, random_start=False))
        theirs = torchattacks.PGDL2(model, eps=eps, alpha=0.2, steps=10, random_start=False)(x, y)
        assert abs(_accuracy(model, ours, y) - _accuracy(model, theirs, y)) <= 1 / len(y)
        assert (ours - theirs).abs().max() < 0.05


def test_deepfool_matches_foolbox(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:96], y[:96]
    ours = deepfool(model, x, y, **attack_params("deepfool", steps=50, overshoot=0.02))
    _, theirs, _ = foolbox.attacks.L2DeepFoolAttack(steps=50, overshoot=0.02)(
        foolbox.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None
    )
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert _accuracy(model, ours, y) == 0.0  # DeepFool crosses every boundary on this model


def test_cw_l2_matches_foolbox(tiny_cnn):
    # the same algorithm; Foolbox's early abort is per batch and ours per image, so compare without it.
    # Foolbox returns an all-zero image where it fails: success is judged on its real outputs only.
    model, x, y = tiny_cnn
    x, y = x[:48], y[:48]
    ours = cw_l2(model, x, y, **attack_params("cw_l2", binary_steps=4, steps=50, abort_early=False))
    _, theirs, _ = foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=4, steps=50, abort_early=False)(
        foolbox.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None
    )
    clean = model(x).argmax(1) == y
    ours_ok = clean & (model(ours).argmax(1) != y)
    theirs_ok = clean & (theirs.flatten(1).abs().sum(1) > 0) & (model(theirs).argmax(1) != y)
    assert torch.equal(ours_ok, theirs_ok) and ours_ok.sum() >= 3
    assert torch.allclose(ours[ours_ok], theirs[ours_ok], atol=1e-4)


def test_cw_l2_targeted_and_its_search_over_c_only_shrinks_perturbations(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:32], y[:32]
    target = (y + 1) % 10
    info = {}
    searched = cw_l2(
        model,
        x,
        y,
        targeted=True,
        target=target,
        **attack_params("cw_l2", c_init=1.0, binary_steps=3, steps=400),
        info=info,
    )
    first_c = cw_l2(
        model,
        x,
        y,
        targeted=True,
        target=target,
        **attack_params("cw_l2", c_init=1.0, binary_steps=1, steps=400),
    )
    ok = model(searched).argmax(1) == target
    assert ok.float().mean() > 0.8
    assert torch.isfinite(info["c_final"][ok]).all() and torch.isnan(info["c_final"][~ok]).all()
    both = ok & (model(first_c).argmax(1) == target)
    l2_searched = (searched - x).flatten(1).norm(dim=1)[both]
    l2_first = (first_c - x).flatten(1).norm(dim=1)[both]
    assert (l2_searched <= l2_first + 1e-6).all() and (l2_searched < l2_first - 1e-3).any()


def test_cw_l2_confidence_gives_the_margin(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:16], y[:16]
    adv = cw_l2(model, x, y, **attack_params("cw_l2", confidence=2.0, c_init=1.0, binary_steps=3, steps=300))
    logits = model(adv)
    done = (adv != x).flatten(1).any(1)
    true = logits.gather(1, y[:, None])[:, 0]
    best_other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    assert done.sum() >= 3 and (best_other[done] - true[done] >= 2.0 - 1e-4).all()


def test_a_restart_never_makes_an_image_worse(tiny_cnn):
    model, x, y = tiny_cnn
    seeds = torch.arange(len(x))
    one = pgd(model, x, y, 0.08, **attack_params("pgd", steps=5), seeds=seeds)
    three = pgd(model, x, y, 0.08, **attack_params("pgd", steps=5, restarts=3), seeds=seeds)
    with torch.no_grad():
        loss_one, logits_one = _loss(model, one, y, False, None)
        loss_three, logits_three = _loss(model, three, y, False, None)
    won_one, won_three = succeeded(logits_one, y, False, None), succeeded(logits_three, y, False, None)
    assert not (won_one & ~won_three).any()  # a success stays a success
    same = won_one == won_three
    assert (loss_three[same] >= loss_one[same] - 1e-6).all()  # otherwise the loss only rises
    assert (won_three & ~won_one).any() or (loss_three > loss_one + 1e-4).any()  # and restarts help


def test_seeded_random_starts_are_reproducible_and_per_image(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:20], y[:20]
    seeds = torch.arange(100, 120)
    three_steps = attack_params("pgd", steps=3)
    a = pgd(model, x, y, 0.1, **three_steps, seeds=seeds)
    assert torch.equal(a, pgd(model, x, y, 0.1, **three_steps, seeds=seeds))
    assert not torch.equal(a, pgd(model, x, y, 0.1, **three_steps, seeds=seeds + 1))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    shuffled = pgd(model, x[order], y[order], 0.1, **three_steps, seeds=seeds[order])
    assert torch.allclose(shuffled, a[order], atol=1e-6)


ATTACKS = {  # (model, x, y, one seed per image) → x_adv
    "bim": lambda m, x, y, s: bim(m, x, y, 0.1, **attack_params("bim", steps=5)),
    "pgd": lambda m, x, y, s: pgd(m, x, y, 0.1, **attack_params("pgd", steps=5, restarts=2), seeds=s),
    "pgd_l2": lambda m, x, y, s: pgd(m, x, y, 1.5, **attack_params("pgd_l2", steps=5), seeds=s),
    "mifgsm": lambda m, x, y, s: mifgsm(m, x, y, 0.1, **attack_params("mifgsm", steps=5)),
    "cw_l2": lambda m, x, y, s: cw_l2(m, x, y, **attack_params("cw_l2", binary_steps=3, steps=30)),
    "deepfool": lambda m, x, y, s: deepfool(m, x, y, **attack_params("deepfool")),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_batched_attack_treats_every_image_on_its_own(tiny_cnn, name):
    model, x, y = tiny_cnn
    x, y = x[:24], y[:24]
    seeds = torch.arange(24)
    together = ATTACKS[name](model, x, y, seeds)
    apart = torch.cat(
        [ATTACKS[name](model, x[i : i + 8], y[i : i + 8], seeds[i : i + 8]) for i in (0, 8, 16)]
    )
    assert torch.allclose(together, apart, atol=1e-5)


def test_eps_list_runs_the_attack_once_per_eps(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:16], y[:16]
    four_steps = attack_params("bim", steps=4)
    together = bim(model, x, y, [0.05, 0.2], **four_steps)
    assert torch.equal(together[0], bim(model, x, y, 0.05, **four_steps))
    assert torch.equal(together[1], bim(model, x, y, 0.2, **four_steps))
