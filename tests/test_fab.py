"""FAB-T (pipeline.attacks.fab): the first steps checked by hand on a linear model, the exact
box-constrained projections, a cross-check with torchattacks' FAB on a trained CNN, seeds and
restarts, early exit, and the invariants of every attack (box, ball, finite) under hypothesis."""

import pytest
import torch
import torchattacks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchattacks.attacks.fab import projection_l2, projection_linf

from pipeline.attacks.deepfool import deepfool
from pipeline.attacks.fab import fab, hyperplane_step
from tests.conftest import attack_params
from tests.test_attack_properties import random_problem

ETA, BETA = 1.05, 0.9  # conf/attack/fab.yaml's, which the hand checks below assume
ROUNDING = 1e-6  # |fl(x + δ) − x| may exceed |δ| by an ulp
DUAL = {"linf": 1, "l2": 2}


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _norms(delta, norm):
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def test_defaults_are_autoattacks():
    assert attack_params("fab") == {
        "norm": "linf",
        "steps": 100,
        "restarts": 1,
        "n_targets": 9,
        "alpha_max": 0.1,
        "eta": ETA,
        "beta": BETA,
    }


def _linear_problem(targeted: bool):
    """A linear model on 6×6 images with pixels in [0.4, 0.6] — far enough from the box's faces
    that it never binds here — the clean labels, the targets (the runner-up; random if targeted),
    and per image the boundary's closed form: f = Z_t − Z_y < 0 and w = ∇f = W_t − W_y."""
    torch.manual_seed(0)
    linear = nn.Linear(36, 10)
    model = nn.Sequential(nn.Flatten(), linear).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(64, 1, 6, 6, generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    if targeted:
        t = (y + torch.randint(1, 10, (64,), generator=g)) % 10
    else:
        t = logits.sort(1).indices[:, -2]
    rows = torch.arange(64)
    f = logits[rows, t] - logits[rows, y]
    w = linear.weight[t] - linear.weight[y]
    return model, x, y, t, f, w


def _closest(f, w, norm):
    """The analytically minimal distance to {f + w·δ = 0}, |f| / ‖w‖_dual, and its step δ*:
    λ·sign(w) with λ = |f|/‖w‖₁ (Linf), |f|·w/‖w‖₂² (L2)."""
    distance = -f / w.norm(p=DUAL[norm], dim=1)
    step = distance[:, None] * w.sign() if norm == "linf" else (-f / w.norm(dim=1) ** 2)[:, None] * w
    return distance, step


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [False, True])
def test_linear_model_first_step_is_the_exact_projection(norm, targeted):
    # Step 1 starts at x, where the projections of the current point and of x coincide: whatever
    # α, it lands on x + η·δ*, just past the boundary between y and t at η times the closed-form
    # minimal distance. Untargeted (FAB-T's one target, the runner-up) that point is adversarial
    # for every image; targeted only where t is also its argmax.
    model, x, y, t, f, w = _linear_problem(targeted)
    distance, step = _closest(f, w, norm)
    point = x + ETA * step.view_as(x)
    # where the unconstrained step stays inside [0,1] it is also the box-constrained one
    clear = ((point > 0) & (point < 1)).flatten(1).all(1)
    assert clear.float().mean() > 0.9
    with torch.no_grad():
        landed = model(point).argmax(1)
    success = landed == t if targeted else landed != y
    assert success.float().mean() > (0.3 if targeted else 0.99)
    ranked = (ETA * distance).sort().values
    eps = (ranked[31] + ranked[32]).item() / 2  # half the images within eps, none on its edge
    info = {}
    kwargs = {"targeted": True, "target": t} if targeted else {}
    adv = fab(model, x, y, eps, **attack_params("fab", norm=norm, steps=1, n_targets=1), info=info, **kwargs)
    found = ~info["min_norm"].isnan()
    assert torch.equal(found[clear], success[clear])
    success = success & clear
    assert torch.allclose(info["min_norm"][success], ETA * distance[success], rtol=2e-6)
    within = success & (ETA * distance <= eps)
    assert within.sum() >= 10
    assert torch.allclose(adv[within], point[within], rtol=0, atol=2e-7)
    # the eps budget: an adversarial beyond eps does not count, the image comes back unchanged
    beyond = clear & ~within
    assert torch.equal(adv[beyond], x[beyond])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_linear_model_later_steps_approach_the_minimal_distance(norm):
    # With no budget to stop at (eps = 0) every step runs. After the first success the backward
    # step puts z at s = β·η of δ*, then the biased step with α = (1 − s)/(2 − s) lands at
    # s' = (s + η(1 − s))(1 − α) + η·α ≈ 1.0052: the smallest adversarial on this line; later
    # steps stay at s > s' (the cycle of success and backward step settles near 1.0085).
    s = BETA * ETA
    alpha = (1 - s) / (2 - s)
    second = (s + ETA * (1 - s)) * (1 - alpha) + ETA * alpha
    for targeted in (False, True):
        model, x, y, t, f, w = _linear_problem(targeted)
        distance, step = _closest(f, w, norm)
        clear = ((x.flatten(1) + ETA * step > 0) & (x.flatten(1) + ETA * step < 1)).all(1)
        info = {}
        kwargs = {"targeted": True, "target": t} if targeted else {}
        fab(model, x, y, 0.0, **attack_params("fab", norm=norm, steps=20, n_targets=1), info=info, **kwargs)
        ratio = info["min_norm"] / distance
        found = ~ratio.isnan()
        if not targeted:
            assert found.all()
            assert torch.allclose(ratio, torch.full_like(ratio, second), rtol=2e-6)
        else:
            # a targeted success needs Z_t ≥ Z_y: never nearer than the minimal distance; never
            # farther than the first step where the box does not bind; another class than t may
            # lead at s' (no success there)
            assert found.sum() >= 20
            assert (ratio[found] >= 1 - 1e-6).all() and (ratio[found & clear] <= ETA + 1e-6).all()
            assert torch.isclose(ratio[found], torch.tensor(second), rtol=2e-6).float().mean() > 0.8


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_is_the_originals(norm):
    # torchattacks' projection_linf / projection_l2 are AutoAttack's fab_projections, verbatim: the
    # same steps (float64) with the box binding, out of reach, zero weights and saturated images
    reference = projection_linf if norm == "linf" else projection_l2
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        size = int(torch.randint(2, 60, (1,), generator=g))
        t = torch.rand(16, size, generator=g, dtype=torch.float64)
        if trial % 3 == 0:
            t = t.round()
        w = torch.randn(16, size, generator=g, dtype=torch.float64)
        if trial % 4 == 0:
            w[torch.rand(16, size, generator=g) < 0.3] = 0
        b = (
            torch.randn(16, generator=g, dtype=torch.float64)
            * size**0.5
            * float(2 * torch.rand(1, generator=g))
        )
        ours = hyperplane_step(t, w, (w * t).sum(1) - b, norm)
        assert ((t + ours) >= 0).all() and ((t + ours) <= 1).all()
        assert torch.allclose(ours, reference(t.clone(), w.clone(), b.clone()), rtol=0, atol=1e-9)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_robust_accuracy_as_torchattacks_fab_t(tiny_cnn, norm, eps):
    # torchattacks.FAB(multi_targeted=True) is AutoAttack's FAB-T, built here with `steps` (its
    # AutoAttack never passes it: FAB would run 10). Its issue #179 — perturb() compares
    # `acc_curr`, a bool tensor, with 0 — is harmless on this torch (bool == 0 is elementwise
    # `not`: the eps check and the update of acc/adv do run, as the accuracy drop below shows).
    # Its defects lie on paths left out here: random restarts (a global generator reseeded per
    # call, not per-image draws) and the single-target mode (targets computed on the whole batch
    # but indexed with positions in the subset still to fool; success tested untargeted). So one
    # run per target from x, deterministic on both sides: the same algorithm, which may part only
    # by float rounding (our batch shrinks as images are broken) on an image sitting on the
    # boundary — tolerance 1 image in 48, measured 0 (linf 36 → 21 correct, l2 36 → 22).
    model, x, y = tiny_cnn
    x, y = x[:48], y[:48]
    theirs = torchattacks.FAB(
        model,
        norm={"linf": "Linf", "l2": "L2"}[norm],
        eps=eps,
        steps=10,
        n_restarts=1,
        multi_targeted=True,
        n_classes=10,
    )(x, y)
    ours = fab(model, x, y, eps, **attack_params("fab", norm=norm, steps=10))
    assert _accuracy(model, theirs, y) < _accuracy(model, x, y) - 0.2
    with torch.no_grad():
        ours_broken, theirs_broken = model(ours).argmax(1) != y, model(theirs).argmax(1) != y
    assert (ours_broken != theirs_broken).sum() <= 1
    assert (_norms(ours - x, norm) <= eps + ROUNDING).all()


def test_min_norms_near_deepfools(tiny_cnn):
    # An independent bound on a real CNN: DeepFool (L2, the nearest linearised boundary, every
    # image broken here) against FAB-T's minimal L2 (2 targets, 20 steps, no eps to stop at).
    # Measured: FAB's norm / DeepFool's in 0.84 .. 1.04, median 0.98.
    model, x, y = tiny_cnn
    x, y = x[:32], y[:32]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    info = {}
    assert torch.equal(
        fab(model, x, y, 0.0, **attack_params("fab", norm="l2", steps=20, n_targets=2), info=info), x
    )
    reference = _norms(deepfool(model, x, y, **attack_params("deepfool")) - x, "l2")
    ratio = info["min_norm"] / reference
    assert torch.equal(ratio.isnan(), ~clean)  # found on every image classified right
    assert (ratio[clean] < 1.1).all() and ratio[clean].median() < 1.0


L2_RESTARTS = {"norm": "l2", "steps": 2, "n_targets": 2}  # where random restarts find smaller norms


def test_seeds_reproduce_and_each_image_is_on_its_own(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:24], y[:24]
    seeds = torch.arange(100, 124)
    params = attack_params("fab", **L2_RESTARTS, restarts=3)
    first, again, other = {}, {}, {}
    a = fab(model, x, y, 1.0, **params, seeds=seeds, info=first)
    assert torch.equal(a, fab(model, x, y, 1.0, **params, seeds=seeds, info=again))
    assert torch.allclose(first["min_norm"], again["min_norm"], rtol=0, atol=0, equal_nan=True)
    fab(model, x, y, 1.0, **params, seeds=seeds + 1, info=other)
    assert not torch.allclose(first["min_norm"], other["min_norm"], equal_nan=True)  # other draws
    apart, norms = [], []
    for i in (0, 8, 16):
        part = {}
        apart.append(fab(model, x[i : i + 8], y[i : i + 8], 1.0, **params, seeds=seeds[i : i + 8], info=part))
        norms.append(part["min_norm"])
    assert torch.allclose(torch.cat(apart), a, atol=1e-5)
    assert torch.allclose(torch.cat(norms), first["min_norm"], atol=1e-5, equal_nan=True)
    alone = {}
    assert torch.allclose(
        fab(model, x[5:6], y[5:6], 1.0, **params, seeds=seeds[5:6], info=alone), a[5:6], atol=1e-5
    )
    assert torch.allclose(alone["min_norm"], first["min_norm"][5:6], atol=1e-5, equal_nan=True)


def test_more_restarts_never_worse(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:32], y[:32]
    seeds = torch.arange(32)
    one, three = {}, {}
    a = fab(model, x, y, 1.0, **attack_params("fab", **L2_RESTARTS), seeds=seeds, info=one)
    b = fab(model, x, y, 1.0, **attack_params("fab", **L2_RESTARTS, restarts=3), seeds=seeds, info=three)
    with torch.no_grad():
        broken_a, broken_b = model(a).argmax(1) != y, model(b).argmax(1) != y
    assert not (broken_a & ~broken_b).any()  # a success stays a success
    assert torch.equal(a[broken_a], b[broken_a])  # broken before any restart: the same adversarial
    had = ~one["min_norm"].isnan()
    assert not three["min_norm"][had].isnan().any()
    assert (three["min_norm"][had] <= one["min_norm"][had]).all()  # the smallest norm only shrinks
    assert (three["min_norm"][had] < one["min_norm"][had]).sum() >= 3  # and restarts do find some


def test_images_leave_the_batch_once_broken():
    # a linear model: every image is broken within eps by its first step towards its first target;
    # then nothing more runs — one forward pass on x, and per step one for the gradient and one to
    # check the new point
    model, x, y, _, _, _ = _linear_problem(False)
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    adv = fab(model, x, y, 1.0, **attack_params("fab", steps=100, restarts=3))
    assert (model(adv).argmax(1) != y).all()
    assert calls[:3] == [64, 64, 64] and len(calls) == 4  # the 4th: the check just above


def test_refuses_bad_arguments():
    model, x, y, _, _, _ = _linear_problem(False)
    with pytest.raises(ValueError, match="needs `target`"):
        fab(model, x, y, 0.1, **attack_params("fab"), targeted=True)
    with pytest.raises(ValueError, match="norm='l1'"):
        fab(model, x, y, 0.1, **attack_params("fab", norm="l1"))
    with pytest.raises(ValueError, match="n_targets=0"):
        fab(model, x, y, 0.1, **attack_params("fab", n_targets=0))
    # a list of eps: one run per value
    both = fab(model, x, y, [0.0, 1.0], **attack_params("fab", steps=2))
    assert torch.equal(both[0], x) and not torch.equal(both[1], x)


cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "batch": st.integers(1, 6),
        "classes": st.integers(2, 5),
        "conv": st.booleans(),
        "targeted": st.booleans(),
        "saturated": st.booleans(),  # images of only 0s and 1s: the box binds everywhere
        "norm": st.sampled_from(["linf", "l2"]),
        "n_targets": st.integers(1, 4),
        "restarts": st.integers(1, 2),
    }
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases, scale=st.floats(0.0, 1.0))
def test_stays_in_the_box_and_the_ball(case, scale):
    model, x, y, target = random_problem(case)
    n = len(x)
    norm = case["norm"]
    eps = scale * (1.0 if norm == "linf" else 6.0)
    kwargs = {"targeted": True, "target": target} if case["targeted"] else {}
    params = attack_params("fab", norm=norm, steps=4, restarts=case["restarts"], n_targets=case["n_targets"])
    info = {}
    adv = fab(model, x, y, eps, **params, seeds=torch.arange(n), info=info, **kwargs)
    assert torch.isfinite(adv).all() and adv.min() >= 0 and adv.max() <= 1
    assert (_norms(adv - x, norm) <= eps * (1 + ROUNDING) + ROUNDING).all()
    with torch.no_grad():
        predicted = model(adv).argmax(1)
    fooled = predicted == target if case["targeted"] else predicted != y
    changed = (adv != x).flatten(1).any(1)
    assert (fooled[changed]).all()  # a changed image is an adversarial, else it comes back as x
    norms = info["min_norm"]
    assert (norms[~norms.isnan()] >= 0).all() and (norms[changed] <= eps * (1 + ROUNDING) + ROUNDING).all()
