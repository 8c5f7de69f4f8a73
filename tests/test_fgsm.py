"""FGSM against a hand computation, against torchattacks, and its invariants."""

import pytest
import torch
import torchattacks
from torch import nn

from pipeline.attacks import fgsm


def _linear_model() -> nn.Linear:
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(
            torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, 2.0, -0.5], [0.3, 0.2, -1.0, 1.5]])
        )
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.05]))
    return model.eval()


def _hand_fgsm(model: nn.Linear, x, labels, eps, sign):
    """d CE(Wx+b, l)/dx = Wᵀ(softmax(Wx+b) − onehot(l)), written out without autograd."""
    W, b = model.weight.detach(), model.bias.detach()
    p = torch.softmax(x @ W.T + b, dim=1)
    grad = (p - torch.eye(3)[labels]) @ W
    return (x + sign * eps * grad.sign()).clamp(0, 1)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 1.0])
def test_matches_hand_computation_on_linear_model(eps):
    model = _linear_model()
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(3))
    y = torch.arange(16) % 3
    target = (y + 1) % 3
    assert torch.equal(fgsm(model, x, y, eps), _hand_fgsm(model, x, y, eps, +1))
    assert torch.equal(
        fgsm(model, x, y, eps, targeted=True, target=target), _hand_fgsm(model, x, target, eps, -1)
    )


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.25])
def test_identical_to_torchattacks_untargeted(tiny_cnn, eps):
    model, x, y = tiny_cnn
    ours = fgsm(model, x, y, eps)
    theirs = torchattacks.FGSM(model, eps=eps)(x, y)
    assert torch.equal(ours, theirs)
    assert (model(ours).argmax(1) != y).any()  # the attack does something on a trained model


def test_identical_to_torchattacks_targeted(tiny_cnn):
    model, x, y = tiny_cnn
    target = (y + 1) % 10
    attack = torchattacks.FGSM(model, eps=0.2)
    attack.set_mode_targeted_by_function(lambda images, labels: (labels + 1) % 10)
    assert torch.equal(fgsm(model, x, y, 0.2, targeted=True, target=target), attack(x, y))


def test_eps_list_equals_separate_calls(tiny_cnn):
    model, x, y = tiny_cnn
    eps_list = [0.0, 0.05, 0.1, 0.3]
    together = fgsm(model, x, y, eps_list)
    assert len(together) == len(eps_list)
    for eps, x_adv in zip(eps_list, together, strict=True):
        assert torch.equal(x_adv, fgsm(model, x, y, eps))


def _random_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()


@pytest.mark.parametrize("seed", range(6))
def test_invariants_on_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    model = _random_cnn(seed)
    x = torch.rand(32, 1, 28, 28, generator=g)
    x[:4] = torch.randint(0, 2, (4, 1, 28, 28), generator=g).float()  # saturated pixels clip
    y = torch.randint(0, 10, (32,), generator=g)
    eps = float(torch.rand(1, generator=g))
    for x_adv in (fgsm(model, x, y, eps), fgsm(model, x, y, eps, targeted=True, target=(y + 3) % 10)):
        assert torch.isfinite(x_adv).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        # float32 rounding of x ± eps may exceed eps by half an ulp of 1.0
        assert (x_adv - x).abs().max() <= eps + 2**-24
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype


def test_works_under_no_grad_and_leaves_model_and_input_alone():
    model = _random_cnn(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    x_before = x.clone()
    params_before = [p.clone() for p in model.parameters()]
    with torch.no_grad():  # as inside Lightning's test loop
        x_adv = fgsm(model, x, y, 0.1)
    assert not x_adv.requires_grad
    assert torch.equal(x, x_before)
    assert all(torch.equal(a, b) for a, b in zip(params_before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_targeted_needs_target():
    with pytest.raises(ValueError, match="target"):
        fgsm(_linear_model(), torch.rand(2, 4), torch.tensor([0, 1]), 0.1, targeted=True)
