"""A frozen classifier rewritten for fast attacks on a CPU: the same function, the same gradients.

Attacks spend their time in forward passes and input gradients of a model whose weights do not
change. `for_cpu_attacks` returns a copy of such a model with three rewrites, each exact up to the
order of floating-point sums (outputs and gradients agree to ~1e-8):

- convolution weights in `channels_last`: oneDNN runs NHWC convolutions without reordering;
- the input gradient of a convolution over a single-channel image as one matrix product and
  `F.fold` (col2im): oneDNN's backward-data kernel for one input channel is ~5x slower;
- a ReLU followed by a max-pooling swapped: max and ReLU commute (both are monotone and ReLU is
  applied element-wise), so the outputs and gradients are the same, and ReLU runs on a quarter
  of the values.

On the MNIST CNN this halves a forward + backward pass on one core (docs/speed.md).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class _InputGradConv(torch.autograd.Function):
    """conv2d whose input gradient is W^T·grad (one GEMM) folded back onto the image; the weights
    get no gradient (they are frozen)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding):
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, stride, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if torch._C._functorch.is_legacy_batchedtensor(grad):
            # autograd.grad(is_grads_batched=True) (DeepFool's Jacobian) vmaps this backward
            # with the legacy batching, which has no rule for the reshapes below
            (grad_x, _, _) = torch.ops.aten.convolution_backward(
                grad, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False],
            )  # fmt: skip
            return grad_x, None, None, None, None
        c_out = weight.shape[0]
        columns = weight.reshape(c_out, -1).t() @ grad.reshape(grad.shape[0], c_out, -1)
        grad_x = F.fold(columns, x.shape[-2:], weight.shape[-2:], padding=ctx.padding, stride=ctx.stride)
        return grad_x, None, None, None, None


class InputGradConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters and state dict) whose input gradient is one GEMM + fold
    while its parameters are frozen; with trainable parameters it is an ordinary Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return super().forward(x)
        return _InputGradConv.apply(x, self.weight, self.bias, self.stride, self.padding)


def _gemm_gradient_applies(conv: nn.Conv2d) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.in_channels == 1
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)  # not "same"/"valid"
    )


def _swap_relu_pool(sequential: nn.Sequential) -> None:
    """ReLU, MaxPool2d → MaxPool2d, ReLU wherever they follow each other (names kept, so the
    state dict is unchanged)."""
    items = list(sequential._modules.items())
    i = 0
    while i < len(items) - 1:
        first, second = items[i][1], items[i + 1][1]
        if type(first) is nn.ReLU and type(second) is nn.MaxPool2d and not second.return_indices:
            items[i], items[i + 1] = items[i + 1], items[i]
            i += 2
        else:
            i += 1
    sequential._modules = OrderedDict(items)


def for_cpu_attacks(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode, parameters frozen) that computes the same logits and input
    gradients faster on a CPU; `model` itself is left as it is. A model with trainable
    parameters is returned unchanged (the rewrites assume frozen weights)."""
    if any(p.requires_grad for p in model.parameters()):
        return model
    fast = copy.deepcopy(model)
    for module in list(fast.modules()):
        if isinstance(module, nn.Sequential):
            _swap_relu_pool(module)
        elif isinstance(module, nn.Conv2d) and _gemm_gradient_applies(module):
            module.__class__ = InputGradConv2d  # the same parameters, buffers and hooks
    return fast.to(memory_format=torch.channels_last).eval()  # 4-d weights only


def attacked_model(model: nn.Module, fast_cpu_model: bool, device: torch.device) -> nn.Module:
    """The model an attack on `device` runs on: `model`, frozen in eval mode, or on a CPU with
    `fast_cpu_model` (the config key) its rewritten copy."""
    model = model.eval().requires_grad_(False)
    return for_cpu_attacks(model) if fast_cpu_model and device.type == "cpu" else model
