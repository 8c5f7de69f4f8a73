"""Networks, checkpoint loading and the checkpoint cache key."""

import json
from pathlib import Path

import pytest
import torch

from pipeline import load_classifier
from pipeline.errors import CheckpointError
from pipeline.models import CNN, MLP
from pipeline.models.training import checkpoint_hash, training_config
from tests.conftest import make_config

FIXTURES = Path(__file__).parent / "fixtures"
CHECKSUMS = {"t10k-images-idx3-ubyte": "abc"}


@pytest.mark.parametrize("net", [CNN(), MLP(), MLP(hidden=[200, 200]), MLP(hidden=[])])
def test_nets_map_images_to_logits(net):
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_is_fc100_100_10():
    shapes = [tuple(p.shape) for p in MLP().parameters()]
    assert shapes == [(100, 784), (100,), (100, 100), (100,), (10, 100), (10,)]


def test_checkpoint_written_before_the_regrouping_still_loads():
    """The fixture was trained when the networks lived in pipeline/models.py: its hyper-parameters
    say `_target_: pipeline.models.CNN`, and the same weights give the same logits today."""
    path = FIXTURES / "cnn-713ef67.ckpt"
    assert torch.load(path, weights_only=True)["hyper_parameters"]["net"]["_target_"] == "pipeline.models.CNN"
    net = load_classifier(path)
    x = torch.linspace(0, 1, 2 * 784).reshape(2, 1, 28, 28)
    expected = torch.tensor(json.loads((FIXTURES / "cnn-713ef67.logits.json").read_text())["logits"])
    torch.testing.assert_close(net(x).detach(), expected)


def test_load_classifier_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read.*train.force=true"):
        load_classifier(bad)


def _hash(*overrides):
    return checkpoint_hash(training_config(make_config(list(overrides)), CHECKSUMS))


def test_cache_key_covers_what_determines_the_weights():
    base = _hash()
    for changed in (
        ["seed=1"],
        ["model=mlp"],
        ["train.epochs=2"],
        ["train.lr=0.01"],
        ["train.n_train=100"],
        ["data.module.val_size=1000"],
        ["model.net.hidden=64"],
        ["trainer.precision=bf16-mixed"],
    ):
        assert _hash(*changed) != base, changed
    assert checkpoint_hash(training_config(make_config([]), {"t10k-images-idx3-ubyte": "x"})) != base


def test_cache_key_ignores_what_does_not():
    base = _hash()
    for same in (
        ["train.force=true"],
        ["eps=0.3"],
        ["n_eval=10"],
        ["attack.batch_size=7"],
        ["paths.outputs=/elsewhere"],
        ["paths.data=/elsewhere"],
        ["data.module.eval_batch_size=10"],
        ["trainer.enable_progress_bar=false"],
    ):
        assert _hash(*same) == base, same
