"""Photos for ImageNet classifiers: a folder of images, or the photos scikit-image ships.

A folder either holds images directly (no labels: the model's clean top-1 becomes each image's
reference label, and the run says so) or one sub-folder per class, named by WordNet id
(n02123045), class name (tabby, "Egyptian cat", Egyptian_cat) or class index (281), as
torchvision's ImageFolder expects. Unreadable files are skipped with a warning that names them
(and listed on the run); a folder with no readable image is an error.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from pipeline.errors import DataError

# scikit-image's bundled photos that show ImageNet-like objects (name → loader attribute)
SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")


def _sample_photos() -> list[tuple[str, Image.Image]]:
    # skimage's __init__.pyi stub does not declare __version__, which the package defines
    from skimage import __version__, data  # type: ignore[attr-defined]

    photos = [
        (
            f"skimage-{__version__}/{name}",
            Image.fromarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()),
        )
        for name in SAMPLES
    ]
    return [(name, photo.convert("RGB")) for name, photo in photos]


def class_index(folder: str, class_names: list[str]) -> int:
    """ImageNet index of a class folder named by index, WordNet id or class name."""
    if folder.isdigit() and int(folder) < len(class_names):
        return int(folder)
    if re.fullmatch(r"n\d{8}", folder):
        from timm.data import ImageNetInfo

        wnids = ImageNetInfo("imagenet-1k").label_names()
        if folder in wnids:
            return wnids.index(folder)
    wanted = folder.replace("_", " ").casefold()
    for i, name in enumerate(class_names):
        if name.casefold() == wanted:
            return i
    raise DataError(
        f"image folder {folder!r} is not an ImageNet class; name class folders by "
        "WordNet id (n02123045), class name (tabby) or index (281)"
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


class PhotoData:
    """Photos at the model's input size as [0,1] tensors; same interface as MNISTData's eval side."""

    def __init__(
        self, images: str | None = None, name: str = "imagenet", num_classes: int = 1000, seed: int = 0
    ) -> None:
        self.images, self.name, self.num_classes, self.seed = images, name, num_classes, seed
        self.checksums: dict[str, str] = {}
        self.skipped: list[str] = []
        self.label_source = ""

    def prepare_data(self) -> None:
        if self.images and not Path(self.images).expanduser().is_dir():
            raise DataError(
                f"data.module.images={self.images} is not a folder; pass a folder of "
                "photos, or leave it unset for scikit-image's sample photos"
            )

    def _files(self) -> list[tuple[str, Path, str | None]]:
        """(name, path, folder label) of every candidate image."""
        assert self.images is not None  # only called when a folder is given
        root = Path(self.images).expanduser()
        classes = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
        if not classes:
            return [(p.name, p, None) for p in _images_in(root)]
        return [(f"{c.name}/{p.name}", p, c.name) for c in classes for p in _images_in(c)]

    def load(self, preprocess, class_names: list[str], classifier: nn.Module) -> None:
        """Read, preprocess and label every photo for `classifier`."""
        loaded, labels, digest = [], [], hashlib.sha256()
        if self.images:
            for name, path, folder in self._files():
                try:
                    with Image.open(path) as photo:
                        tensor = preprocess(photo.convert("RGB"))
                except (OSError, UnidentifiedImageError, ValueError) as error:
                    warnings.warn(f"skipping unreadable image {path} ({error})", stacklevel=2)
                    self.skipped.append(str(path))
                    continue
                loaded.append((name, tensor))
                labels.append(None if folder is None else class_index(folder, class_names))
                digest.update(path.read_bytes())
        else:
            for name, sample in _sample_photos():
                loaded.append((name, preprocess(sample)))
                labels.append(None)
                digest.update(sample.tobytes())
        if not loaded:
            raise DataError(
                f"no readable image in {self.images}; put JPEG or PNG files there "
                "(or class sub-folders of them)"
            )
        self.names = [name for name, _ in loaded]
        self.x = torch.stack([tensor for _, tensor in loaded])  # (N, 3, H, W) in [0, 1]
        if any(label is None for label in labels):
            with torch.no_grad():
                self.y = classifier(self.x).argmax(1)
            self.label_source = "model top-1 (no class folders)"
        else:
            self.y = torch.tensor(labels)
            self.label_source = "class folders"
        self.checksums = {"photos": digest.hexdigest()}

    @property
    def test_size(self) -> int:
        return len(self.names)

    def eval_subset(self, n_eval: int | None, seed: int) -> tuple[list[int], TensorDataset]:
        """`n_eval` photos drawn with `seed` (all of them for None), in file order."""
        n = len(self.names) if n_eval is None else n_eval
        order = torch.randperm(len(self.names), generator=torch.Generator().manual_seed(seed))
        indices = order[:n].sort().values
        return indices.tolist(), TensorDataset(self.x[indices], self.y[indices], torch.arange(n))
