"""Szegedy et al.'s optimisation attack: the SGD variant and batched box-constrained L-BFGS."""

import math
import sys

import pytest
import torch
from torch import nn

from pipeline.attacks import lbfgs, szegedy_sgd
from pipeline.attacks.lbfgs import next_c
from pipeline.attacks.losses import attack_loss, succeeded
from tests.conftest import attack_params


def _linear(weight, bias, dtype=torch.float32) -> nn.Linear:
    weight = torch.tensor(weight, dtype=dtype)
    model = nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(torch.tensor(bias, dtype=dtype))
    return model.eval().requires_grad_(False)


def _small_mlp(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).to(dtype).eval()


def test_lbfgs_finds_the_closed_form_minimal_perturbation_of_a_linear_model():
    # two classes: the images where class 1 wins are the half-space (w1 - w0)·x + b1 - b0 > 0,
    # so the smallest L2 change of x that gets there is its distance to that hyperplane
    model = _linear([[1.0, -0.5, 0.25, 0.0, 2.0, -1.0], [-0.5, 0.5, 0.0, 1.0, 0.5, 0.0]], [0.3, -0.2])
    x = 0.5 + 0.05 * torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    y, target = torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)
    logits = model(x)
    assert (logits.argmax(1) == 0).all()
    normal = model.weight[1] - model.weight[0]
    distance = (logits[:, 0] - logits[:, 1]) / normal.norm()
    info = {}
    x_adv = lbfgs(
        model,
        x,
        y,
        target,
        targeted=True,
        **attack_params("lbfgs", c_steps=15, ftol=1e-7, gtol=1e-8),
        info=info,
    )
    found = (x_adv - x).norm(dim=1)
    assert (model(x_adv).argmax(1) == 1).all()
    assert (found >= distance - 1e-5).all()  # nothing closer exists
    assert torch.allclose(found, distance, rtol=1e-3)  # and a fine search gets within 0.1%
    direction = (x_adv - x) / found[:, None]
    assert torch.allclose(direction, (normal / normal.norm()).expand_as(direction), atol=1e-3)
    assert torch.isfinite(info["c_final"]).all()
    # the defaults (9 values of c, as AdverTorch) stop at a coarser bracket of c
    coarse = (lbfgs(model, x, y, target, targeted=True, **attack_params("lbfgs")) - x).norm(dim=1)
    assert (coarse >= distance - 1e-5).all() and torch.allclose(coarse, distance, rtol=0.06)


def test_c_search_grows_on_failure_and_bisects_on_success():
    c, low, high = torch.tensor([0.01]), torch.zeros(1), torch.tensor([math.inf])
    steps = []
    for success in (False, False, True, False, True):
        c, low, high = next_c(c, low, high, torch.tensor([success]))
        steps.append((c.item(), low.item(), high.item()))
    expected = [
        (0.1, 0.01, math.inf),
        (1.0, 0.1, math.inf),
        (0.55, 0.1, 1.0),
        (0.775, 0.55, 1.0),
        (0.6625, 0.55, 0.775),
    ]
    assert steps == [pytest.approx(e, rel=1e-6) for e in expected]


def test_lbfgs_keeps_the_smallest_successful_point_it_evaluated():
    class Recorder(nn.Module):  # every point the attack evaluates, with its prediction
        def __init__(self, net):
            super().__init__()
            self.net, self.seen = net, []

        def forward(self, z):
            logits = self.net(z)
            self.seen += list(zip(z.detach().flatten(1), logits.argmax(1), strict=True))
            return logits

    net = _small_mlp(1)
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y, target = net(x).topk(2).indices.T  # the runner-up class is reachable in the box
    for i in range(4):  # one image per call, so every recorded point belongs to it
        model = Recorder(net)
        x_adv = lbfgs(
            model,
            x[i : i + 1],
            y[i : i + 1],
            target[i : i + 1],
            targeted=True,
            **attack_params("lbfgs", c_init=1.0, max_iter=30),
        )
        distances = [(z - x[i].flatten()).norm().item() for z, p in model.seen if p == target[i]]
        assert len(distances) > 1
        assert (x_adv - x[i : i + 1]).norm().item() == pytest.approx(min(distances), abs=1e-6)


@pytest.mark.parametrize("attack", ["lbfgs", "szegedy_sgd"])
def test_each_image_is_its_own_problem(attack):
    model = _small_mlp(2, torch.float64)
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    target = (y + 1) % 5
    run = {
        "lbfgs": lambda a, b, t: lbfgs(
            model, a, b, t, targeted=True, **attack_params("lbfgs", c_steps=4, max_iter=40)
        ),
        "szegedy_sgd": lambda a, b, t: szegedy_sgd(
            model, a, b, t, targeted=True, **attack_params("szegedy_sgd", steps=30)
        ),
    }[attack]
    together = run(x, y, target)
    alone = torch.cat([run(x[i : i + 1], y[i : i + 1], target[i : i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-9)


def test_untargeted_success_means_leaving_the_true_class(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:24], y[:24]
    clean = model(x).argmax(1)
    x_adv = lbfgs(model.requires_grad_(False), x, y, targeted=False, **attack_params("lbfgs", c_steps=6))
    predicted = model(x_adv).argmax(1)
    right = clean == y
    assert (predicted[right] != y[right]).all()  # every clean-correct image flipped
    assert torch.equal(x_adv[~right], x[~right])  # already wrong: left alone
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    assert succeeded(logits, torch.tensor([0, 0]), False, None).tolist() == [False, True]
    assert succeeded(logits, torch.tensor([0, 0]), True, torch.tensor([0, 2])).tolist() == [True, False]
    # −log(1 − p_y): zero when p_y → 0, growing as the true class dominates
    low = attack_loss(torch.tensor([[-20.0, 5.0]]), torch.tensor([0]), False, None)
    high = attack_loss(torch.tensor([[5.0, -20.0]]), torch.tensor([0]), False, None)
    assert low.item() == pytest.approx(0, abs=1e-9) and high.item() > 20


def _sgd_by_hand(model, x, target, reg, lr, momentum, steps):
    """The SGD variant on a linear model without autograd: d/dr [CE(W(x+r)+b, t) + reg·||r||²]
    = Wᵀ(softmax − onehot(t)) + 2·reg·r, heavy-ball momentum, x + r kept in [0,1]."""
    W, b = model.weight, model.bias
    r, v = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        p = torch.softmax((x + r) @ W.T + b, dim=1)
        grad = (p - torch.eye(W.shape[0])[target]) @ W + 2 * reg * r
        v = momentum * v + grad
        r = (x + r - lr * v).clamp(0, 1) - x
    return x + r


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_szegedy_sgd_matches_hand_computation_on_linear_model(momentum):
    model = _linear([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 2.0, -0.5], [0.3, 0.2, -1.0, 1.5]], [0.1, -0.2, 0.05])
    x = torch.rand(10, 4, generator=torch.Generator().manual_seed(4))
    y = torch.arange(10) % 3
    target = (y + 1) % 3
    ours = szegedy_sgd(model, x, y, target, targeted=True, reg=0.1, lr=0.2, steps=5, momentum=momentum)
    assert torch.allclose(ours, _sgd_by_hand(model, x, target, 0.1, 0.2, momentum, 5), atol=1e-6)


def test_szegedy_sgd_regularisation_trades_success_for_size(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:32], y[:32]
    target = (y + 1) % 10
    adversarials = [
        szegedy_sgd(model, x, y, target, targeted=True, **attack_params("szegedy_sgd", reg=reg))
        for reg in (0.01, 1.0)
    ]
    sizes = [(adv - x).flatten(1).norm(dim=1).mean().item() for adv in adversarials]
    assert sizes[1] < sizes[0]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("targeted", [True, False])
def test_box_and_finiteness_on_random_inputs(seed, targeted):
    g = torch.Generator().manual_seed(seed)
    model = _small_mlp(seed)
    x = torch.rand(12, 1, 4, 4, generator=g)
    x[:3] = torch.randint(0, 2, (3, 1, 4, 4), generator=g).float()  # saturated pixels
    y = torch.randint(0, 5, (12,), generator=g)
    target = (y + torch.randint(1, 5, (12,), generator=g)) % 5 if targeted else None
    for x_adv in (
        lbfgs(model, x, y, target, targeted=targeted, **attack_params("lbfgs", c_steps=4, max_iter=30)),
        szegedy_sgd(model, x, y, target, targeted=targeted, **attack_params("szegedy_sgd", steps=20, lr=0.5)),
    ):
        assert torch.isfinite(x_adv).all() and x_adv.shape == x.shape
        assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_targeted_attacks_need_a_target():
    model, x, y = _small_mlp(0), torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    for attack in (lbfgs, szegedy_sgd):
        with pytest.raises(ValueError, match="target"):
            attack(model, x, y, targeted=True, **attack_params(attack.__name__))


def test_lbfgs_is_no_worse_than_advertorch(tiny_cnn):
    """AdverTorch's LBFGSAttack (scipy L-BFGS-B over the whole batch) on the same images: our
    per-image search must succeed as often with mean L2 no larger (1% slack)."""
    gradcheck = sys.modules["torch.autograd.gradcheck"]
    if not hasattr(gradcheck, "zero_gradients"):
        gradcheck.zero_gradients = lambda x: None  # advertorch 0.2.3 imports it; unused here
    from advertorch.attacks import LBFGSAttack

    model, x, y = tiny_cnn
    x, y = x[:8], y[:8]
    target = (y + 1) % 10
    theirs = LBFGSAttack(model, num_classes=10, targeted=True).perturb(x, target)
    ours = lbfgs(model, x, y, target, targeted=True, **attack_params("lbfgs"))
    ok_theirs, ok_ours = model(theirs).argmax(1) == target, model(ours).argmax(1) == target
    assert ok_ours.sum() >= ok_theirs.sum()
    both = ok_theirs & ok_ours
    l2 = {
        name: (adv - x)[both].flatten(1).norm(dim=1).mean().item()
        for name, adv in (("ours", ours), ("theirs", theirs))
    }
    assert l2["ours"] <= 1.01 * l2["theirs"], l2
