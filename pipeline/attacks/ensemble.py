"""AutoAttack (Croce & Hein 2020): an ensemble of parameter-free attacks run one after another,
each only on the images every earlier one failed on, each image keeping the first adversarial
found — so its robust accuracy is the accuracy under the strongest of them, image by image.

The versions are lists of components in conf/attack/autoattack.yaml; a component names an attack
config (apgd, apgd_t, fab, square) and overrides some of its keys, so every hyper-parameter keeps
one home: the component's own conf/attack/<attack>.yaml.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.attacks.projection import check_norm, per_eps

BROKEN_BY = "broken_by"  # info key: per image, the index of the component that broke it
COMPONENT_SECONDS = "component_seconds"  # info key: per image and component, its share of the time
ROBUST = -1  # broken_by of an image no component broke
MISCLASSIFIED = -2  # broken_by of an image misclassified before any attack
SEED_STRIDE = 1_000_003  # components draw from different per-image seeds


@functools.cache
def _attack(attack: str) -> tuple[Any, dict[str, Any]]:
    """conf/attack/<attack>.yaml's function and hyper-parameters (read without Hydra)."""
    from pipeline.config import attack_config, attack_function, attack_kwargs

    config = attack_config(attack)
    return attack_function(config, where=attack), attack_kwargs(config, where=attack)


def components(versions: Mapping[str, Sequence[Mapping]], version: str) -> list[dict[str, Any]]:
    """The version's components: [{"name", "attack", **overrides}, ...]."""
    if version not in versions:
        raise ValueError(f"version={version!r}; use one of {', '.join(versions)}")
    return [dict(c) for c in versions[version]]


def component_call(component: Mapping[str, Any], norm: str) -> functools.partial:
    """The component's attack function with its config's defaults, the overrides and `norm` (if
    it takes one) bound."""
    function, defaults = _attack(str(component["attack"]))
    overrides = {k: v for k, v in component.items() if k not in ("name", "attack")}
    norm_kw = {"norm": norm} if "norm" in inspect.signature(function).parameters else {}
    return functools.partial(function, **{**defaults, **overrides, **norm_kw})


@per_eps
def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str,
    version: str,
    versions: Mapping[str, Sequence[Mapping]],
    targeted: bool = False,
    target: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Run `versions[version]`'s components in order at radius `eps` in `norm`; each sees only the
    images still classified correctly, and an image keeps the first adversarial that fools the
    model. `info` gets `broken_by` (B,) — the component that broke each image, ROBUST or
    MISCLASSIFIED — and `component_seconds` (B, components): each component's time spread evenly
    over the batch, so that summing over images gives the time spent in it."""
    check_norm(norm)
    if targeted:
        raise ValueError("autoattack is untargeted (APGD-T and FAB-T choose their own target classes)")
    parts = components(versions, version)
    calls = [component_call(c, norm) for c in parts]
    x = x.detach()
    seeds = torch.arange(len(x)) if seeds is None else seeds.cpu()
    x_adv = x.clone()
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    broken_by = torch.full((len(x),), MISCLASSIFIED, dtype=torch.long)
    broken_by[robust.cpu()] = ROBUST
    seconds = torch.zeros(len(x), len(parts))
    for i, call in enumerate(calls):
        index = robust.nonzero().squeeze(1)
        if len(index) == 0:
            break
        start = time.perf_counter()
        takes = inspect.signature(call.func).parameters
        kwargs: dict[str, Any] = {"info": {}} if "info" in takes else {}
        if "seeds" in takes:
            kwargs["seeds"] = seeds[index.cpu()] + i * SEED_STRIDE
        found = call(model, x[index], y[index], eps, **kwargs)
        with torch.no_grad():
            fooled = model(found).argmax(1) != y[index]
        x_adv[index[fooled]] = found[fooled]
        robust[index[fooled]] = False
        broken_by[index[fooled].cpu()] = i
        seconds[:, i] = (time.perf_counter() - start) / len(x)
    if info is not None:
        info[BROKEN_BY] = broken_by
        info[COMPONENT_SECONDS] = seconds
    return x_adv
