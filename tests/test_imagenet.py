"""Pretrained ImageNet classifiers on real photos, offline."""

import json
import shutil
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from torchvision import transforms as T

from pipeline.attacks import fgsm
from pipeline.data.photos import PhotoData, _sample_photos, class_index
from pipeline.errors import DataError
from pipeline.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, efficientnet_lite0, imagenet_categories
from pipeline.run import run
from tests.conftest import all_runs, make_config

CATS = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def photos(lite0):
    return {name.split("/")[1]: lite0.preprocess(photo) for name, photo in _sample_photos()}


def _top(model, x):
    with torch.no_grad():
        p = model(x[None]).softmax(1)[0]
    return p, imagenet_categories()[int(p.argmax())]


def test_efficientnet_lite0_knows_a_cat_and_an_espresso(lite0, photos):
    assert _top(lite0.net, photos["chelsea"])[1] in CATS
    assert _top(lite0.net, photos["coffee"])[1] in {"espresso", "cup"}


def test_lite0_input_scaling_is_the_one_its_weights_expect(lite0, photos):
    """(x·255 − 127)/128 puts more probability on the right classes than ImageNet's mean/std:
    the weights were trained with TensorFlow's inception-style scaling, not torchvision's."""
    names = imagenet_categories()
    right = {"chelsea": CATS, "coffee": {"espresso", "cup"}, "motorcycle": {"moped", "motor scooter"}}
    imagenet_scaled = torch.nn.Sequential(T.Normalize(IMAGENET_MEAN, IMAGENET_STD), lite0.net[1])
    for photo, classes in right.items():
        ids = [names.index(c) for c in classes]
        ours = _top(lite0.net, photos[photo])[0][ids].sum()
        other = _top(imagenet_scaled, photos[photo])[0][ids].sum()
        assert ours > other, photo


def test_fgsm_at_a_small_eps_changes_the_cats_class(lite0, photos):
    x = photos["chelsea"][None]
    y = lite0.net(x).argmax(1)
    x_adv = fgsm(lite0.net.requires_grad_(False), x, y, 0.002)
    assert lite0.net(x_adv).argmax(1) != y
    assert (x_adv - x).abs().max() <= 0.002 + 2**-24 and 0 <= x_adv.min() and x_adv.max() <= 1


def _imagenet(tmp_path, *extra):
    return make_config(
        ["data=imagenet", f"paths.outputs={tmp_path}", "trainer.enable_progress_bar=false", *extra]
    )


def test_vgg16_with_random_weights_runs_the_whole_step(store, tmp_path):
    metrics = run(_imagenet(tmp_path, "model=vgg16", "model.weights=null", "n_eval=2", "eps=0.01"))
    assert metrics["clean_accuracy"] == 1  # no labels: the model's own top-1 is the reference
    assert {"top5_success_rate", "confidence_clean_mean"} <= set(metrics)
    (attack,) = all_runs(store)
    assert attack.info.status == "FINISHED" and attack.data.tags["weights"] == "random weights"
    assert attack.data.tags["labels"].startswith("model top-1")
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(attack.info.run_id)}
    assert {"examples_eps0.01.png", "per_image_eps0.01.json"} <= artifacts


def test_an_fgsm_sweep_on_the_bundled_photos(store, tmp_path, monkeypatch):
    from pipeline.__main__ import main
    from tests.test_cli import invoke_ok, sweep_children

    monkeypatch.setattr(sys, "argv", sys.argv)
    invoke_ok(
        main,
        ["data=imagenet", "model=efficientnet_lite0", "attack=fgsm", "eps=0.002,0.005,0.01", "-m"],
        tmp_path,
    )
    (parent,), children = sweep_children(store)
    kids = children[parent.info.run_id]
    assert len(kids) == 3 and all(k.data.params["n_eval"] == "None" for k in kids)
    rates = sorted((k.data.metrics["eps"], k.data.metrics["success_rate"]) for k in kids)
    assert rates[-1][1] == 1.0 and [r for _, r in rates] == sorted(r for _, r in rates)


def _folder(tmp_path, layout):
    """Photos saved as JPEG under tmp_path/photos/<sub>/<name>.jpg for {sub: [sample names]}."""
    samples = dict((name.split("/")[1], photo) for name, photo in _sample_photos())
    root = tmp_path / "photos"
    for sub, names in layout.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            samples[name].save(root / sub / f"{name}.jpg")
    return root


def test_class_folders_give_true_labels(store, tmp_path):
    root = _folder(tmp_path, {"n02123045": ["chelsea"], "espresso": ["coffee"], "670": ["motorcycle"]})
    run(_imagenet(tmp_path, "model=efficientnet_lite0", f"data.images={root}", "eps=0.001"))
    (attack,) = all_runs(store)
    assert attack.data.tags["labels"] == "class folders"
    client = MlflowClient(store)
    path = client.download_artifacts(attack.info.run_id, "per_image_eps0.001.json", str(tmp_path))
    table = json.loads(open(path).read())
    column = {name: i for i, name in enumerate(table["columns"])}
    truth = {row[column["image"]]: row[column["true"]] for row in table["data"]}
    assert truth == {
        "670/motorcycle.jpg": "motor scooter",
        "espresso/coffee.jpg": "espresso",
        "n02123045/chelsea.jpg": "tabby",
    }


def test_an_unreadable_image_is_skipped_with_a_warning(store, tmp_path):
    root = _folder(tmp_path, {".": ["chelsea", "coffee"]})
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*broken\.jpg"):
        metrics = run(_imagenet(tmp_path, "model=efficientnet_lite0", f"data.images={root}"))
    (attack,) = all_runs(store)
    assert attack.info.status == "FINISHED" and "broken.jpg" in attack.data.tags["skipped_images"]
    assert metrics["clean_accuracy"] == 1.0  # two photos, labelled by the model's top-1


def test_folder_problems_are_clear_errors(tmp_path, lite0):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no readable image in"):
        PhotoData(str(empty)).load(lite0.preprocess, lite0.class_names, lite0.net)
    with pytest.raises(DataError, match="is not a folder"):
        PhotoData(str(tmp_path / "missing")).prepare_data()
    with pytest.raises(DataError, match=r"'kittens' is not an ImageNet class.*WordNet id"):
        class_index("kittens", imagenet_categories())
    assert class_index("Egyptian_cat", imagenet_categories()) == 285
    assert class_index("n02123045", imagenet_categories()) == 281
    shutil.rmtree(empty)


def test_missing_weights_offline_is_one_clear_line(store, tmp_path, capsys, monkeypatch):
    from pipeline.__main__ import main
    from tests.test_cli import invoke

    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    code = invoke(main, ["data=imagenet", "model=vgg16", "model.download=false"], tmp_path)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and all_runs(store) == []
    assert line.startswith(
        "error: vgg16 ImageNet weights are not available offline: place "
        "vgg16-397923af.pth (from https://download.pytorch.org/models/vgg16-397923af.pth)"
    )
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in line and "model.weights_path" in line
