"""for_cpu_attacks: the same logits and input gradients as the model it copies (in float64, where
rounding cannot move a max-pooling's choice), the same attack results, the original untouched."""

import pytest
import torch
from torch import nn

from pipeline.attacks import deepfool, pgd
from pipeline.attacks.apgd import apgd
from pipeline.models import CNN, MLP
from pipeline.models.fast import InputGradConv2d, for_cpu_attacks
from tests.conftest import attack_params


def _frozen(net: nn.Module, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return net.to(dtype).eval().requires_grad_(False)


def _logits_and_gradient(model, x):
    z = x.clone().requires_grad_(True)
    logits = model(z)
    (gradient,) = torch.autograd.grad(logits.logsumexp(1).sum() + logits[:, 3].sum(), z)
    return logits, gradient


NETS = {
    "cnn": lambda: CNN(),
    "cnn padding 2": lambda: CNN(padding=2),
    "cnn 3 channels": lambda: CNN(channels=(8, 16), in_channels=3, hidden=32),
    "mlp": lambda: MLP(),
}


@pytest.mark.parametrize("name", NETS)
def test_same_logits_and_input_gradients(name):
    model = _frozen(NETS[name]())
    channels = 3 if "3 channels" in name else 1
    x = torch.rand(16, channels, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = for_cpu_attacks(model)
    (logits, gradient), (fast_logits, fast_gradient) = (_logits_and_gradient(m, x) for m in (model, fast))
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_gradient, gradient, rtol=0, atol=1e-12)
    assert gradient.abs().max() > 1e-3  # a gradient worth comparing


def test_the_rewrites_and_what_stays():
    model = _frozen(CNN(), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = for_cpu_attacks(model)
    # the copy: a GEMM input gradient for the single-channel conv, max-pooling before ReLU,
    # channels_last weights, and the same state dict
    kinds = [type(m).__name__ for m in fast]
    assert kinds[1:7] == ["InputGradConv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]
    assert fast[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert fast[4].weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast[4].weight.is_contiguous()  # 32 input channels: really reordered
    assert fast.state_dict().keys() == before.keys()
    for key, value in fast.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the original: as it was
    assert [type(m).__name__ for m in model][1:4] == ["Conv2d", "ReLU", "MaxPool2d"]
    assert model[4].weight.is_contiguous() and type(model[1]) is nn.Conv2d
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_trainable_model_is_left_as_it_is():
    model = CNN()
    assert for_cpu_attacks(model) is model
    conv = InputGradConv2d(1, 4, 3)  # trainable: an ordinary convolution, weights get gradients
    conv(torch.rand(2, 1, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_deepfool_jacobian_through_the_gemm_gradient():
    """DeepFool's candidates' gradients are one batched backward (is_grads_batched): the GEMM
    gradient falls back to the convolution's own kernel there, with the same result."""
    model = _frozen(CNN())
    fast = for_cpu_attacks(model)
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = model(x).argmax(1)
    params = attack_params("deepfool", steps=5)
    torch.testing.assert_close(
        deepfool(fast, x, y, **params), deepfool(model, x, y, **params), atol=1e-10, rtol=0
    )


def test_attacks_on_a_trained_cnn_find_the_same(tiny_cnn):
    """float32, as attacks run: the same robust accuracy from PGD and APGD on either model."""
    model, x, y = tiny_cnn
    model = model.eval().requires_grad_(False)
    fast = for_cpu_attacks(model)
    x, y, seeds = x[:64], y[:64], torch.arange(64)  # the same random starts for both
    for attack, params in ((pgd, attack_params("pgd", steps=10)), (apgd, attack_params("apgd", steps=10))):
        robust = [
            int((m(attack(m, x, y, 0.15, **params, seeds=seeds)).argmax(1) == y).sum()) for m in (model, fast)
        ]
        assert robust[0] == robust[1], (attack.__name__, robust)
        assert 0 < robust[0] < 64
