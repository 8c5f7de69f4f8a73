"""Timing: warm-up, round-robin repeats, medians; the forward(+backward) passes an attack needs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.attack_step import sync

Batch = Callable[[torch.Tensor, torch.Tensor], object]


def median_seconds(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device,
    warmups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Median wall time of each function over `repeats` calls after one warm-up call each
    (of `warmups[name]` if given: a cheaper call that warms the same code).

    Repeats go round-robin over the functions, so drift in the machine's speed during
    the measurement reaches every function alike and their ratios stay fair."""
    for name in fns:
        (warmups or fns)[name]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def over_batches(fn: Batch, batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fn(x_batch, y_batch) -> tensor, applied batch by batch, results concatenated."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                cast(torch.Tensor, fn(x[i : i + batch_size], y[i : i + batch_size]))
                for i in range(0, len(x), batch_size)
            ]
        )

    return run


def forward_backward(model: nn.Module, passes: int = 1) -> Batch:
    """The floor for one batch: `passes` forward+backward passes; returns the input gradient."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for _ in range(passes):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
        return grad

    return run


def forward_jacobian(model: nn.Module, rows: int) -> Batch:
    """The floor of one Jacobian step for a batch: a forward pass and the input gradients of
    `rows` logits, as one batched (vmapped) backward pass, as DeepFool's candidates need them."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)[:, :rows]
            eye = torch.eye(rows, dtype=logits.dtype, device=x.device)
            seeds = eye[:, None, :].expand(rows, len(x), rows)  # one one-hot row per logit
            (grads,) = torch.autograd.grad(logits, x, grad_outputs=seeds, is_grads_batched=True)
        return grads.transpose(0, 1)  # (B, rows, ...): images first, as every batch result

    return run


def forward(model: nn.Module) -> Batch:
    """One forward pass per image of a batch without gradients (evaluating adversarials)."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return run


def forwards(model: nn.Module, passes: int) -> Batch:
    """The floor of a black-box attack for one batch: `passes` forward passes without gradients
    (Square's queries)."""

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for _ in range(passes):
                logits = model(x)
        return logits

    return run
