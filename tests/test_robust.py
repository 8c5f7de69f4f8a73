"""`python -m pipeline.papers.robust`: adversarially trained models beside the published ones, run for
real on a tiny recipe (500 training images, one epoch) and 100 test images."""

import contextlib
import io
import json
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.attacks import pgd
from pipeline.cli import entrypoint
from pipeline.errors import ConfigError
from pipeline.models import load_classifier
from pipeline.papers.published import predict
from pipeline.papers.robust import (
    ATTACKS,
    PAPERS,
    bind,
    recipe_config,
    selected,
    settings_of,
    surviving,
    table,
)
from pipeline.papers.robust import main as robust_main
from pipeline.parallel import CoreSplit
from tests.conftest import DATA_ROOT, all_runs, make_config

# every recipe trains on 500 images for one epoch; the attacks take a few steps on 100 test images.
# pgd40 and pgd50 share their step count and step size: pgd50's first restart is pgd40's attack.
TINY = [
    f"paths.data={DATA_ROOT}",
    "trainer.enable_progress_bar=false",
    'every_recipe=["train.n_train=500","train.epochs=1","train.robust_eval.n=50","train.log_every_n_steps=5"]',
    "n=100",
    "pgd40.steps=5",
    "pgd50.steps=5",
    "pgd50.restarts=3",
    "pgd100.steps=8",
    "pgd100.restarts=2",
    "autoattack.n=50",
    "+autoattack.versions.quick=[{name:apgd_ce,attack:apgd,steps:5},{name:square,attack:square,queries:30}]",
    "autoattack.version=quick",
]


def _run(argv: list[str]) -> tuple[str, str, int]:
    """`python -m pipeline.papers.robust <argv>` in this process: (stdout, stderr, exit status)."""
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        patch.setattr(sys, "argv", ["robust", *argv])
        try:
            entrypoint(robust_main)
            code = 0
        except SystemExit as done:
            code = int(done.code or 0)
    return out.getvalue(), err.getvalue(), code


@pytest.fixture(scope="module")
def produced(mnist_root, tmp_path_factory):
    """One real run of the command with the default recipe (`fast`), shrunk: (printed, outputs, store)."""
    outputs = tmp_path_factory.mktemp("robust")
    store = f"sqlite:///{outputs}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        printed, errors, code = _run([f"paths.outputs={outputs}", *TINY])
    assert code == 0, errors[-3000:]
    return printed, outputs, store


def _record(outputs) -> dict:
    (js,) = (outputs / "robust").glob("*.json")
    return json.loads(js.read_text())


def test_the_table_has_every_attack_beside_the_published_numbers(produced):
    printed, outputs, _ = produced
    (md,) = (outputs / "robust").glob("*.md")
    text = md.read_text()
    assert text in printed
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    header = next(line for line in text.splitlines() if line.startswith("| |"))
    assert "fast (ours)" in header and "Wong et al. 2020 (fast FGSM)" in header
    labels = [
        "clean",
        "FGSM",
        "PGD-5, step 0.01",
        "PGD-5 × 3 restarts, step 0.01",
        "PGD-8 × 2 restarts, step 0.01",
        "AutoAttack (quick, first 50 images)",
    ]
    for label in [*labels, "model", "training", "epochs", "training time"]:
        assert label in rows, label
    cells = {label: [c.strip() for c in rows[label].strip(" |").split("|")] for label in rows}
    # columns: ours, then Madry et al., Wong et al., TRADES
    assert cells["clean"][3] == "98.50%" and cells["PGD-5 × 3 restarts, step 0.01"][3] == "88.77%"
    assert cells["AutoAttack (quick, first 50 images)"][2:] == ["88.50%", "82.93%", "92.81%"]
    assert cells["epochs"][1:] == ["1 (kept 1)", "~83 (100,000 steps)", "10", "100"]
    assert cells["training time"][3] == "—"
    record = _record(outputs)
    results = record["recipes"]["fast"]["results"]
    for label, row in zip(labels, ("clean", *ATTACKS), strict=True):
        assert cells[label][1] == f"{results[row]['accuracy']:.2%}"
    assert "PGD-100: 2 restart(s) (Madry et al.'s leaderboard: 50" in text  # R as configured


def test_restarts_never_raise_the_accuracy(produced):
    _, outputs, _ = produced
    results = _record(outputs)["recipes"]["fast"]["results"]
    clean = results["clean"]["accuracy"]
    assert 0.2 < clean <= 1  # one epoch on 500 images: better than chance
    for attack in ATTACKS:
        assert results[attack]["accuracy"] <= clean
        per_restart = results[attack]["per_restart"]
        assert per_restart == sorted(per_restart, reverse=True)
        assert results[attack]["accuracy"] == per_restart[-1]
    assert len(results["pgd50"]["per_restart"]) == 3 and len(results["pgd100"]["per_restart"]) == 2
    # PGD-5 × 3 restarts against the same attack with one restart, on the same images and seeds
    assert results["pgd50"]["per_restart"][0] == results["pgd40"]["accuracy"]
    assert results["pgd50"]["accuracy"] <= results["pgd40"]["accuracy"]


def test_files_mlflow_run_and_cached_checkpoint(produced):
    _, outputs, store = produced
    record = _record(outputs)
    fast = record["recipes"]["fast"]
    assert record["settings"]["n"] == 100 and record["eps"] == 0.3
    assert fast["overrides"][0] == "train=adversarial" and "train.n_train=500" in fast["overrides"]
    assert fast["model"] == "cnn" and fast["paper"] == "Madry et al. 2018"  # train.method=pgd
    assert fast["card"]["epochs_run"] == 1 and fast["card"]["train_seconds"] > 0
    assert (outputs / "checkpoints" / f"cnn-{fast['checkpoint_hash']}.ckpt").is_file()

    client = MlflowClient(store)
    (run,) = all_runs(store, "robust")
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "robust"
    assert run.data.tags["fast.checkpoint_hash"] == fast["checkpoint_hash"]
    assert run.data.params["pgd50.restarts"] == "3" and run.data.params["recipes"] == "fast"
    for row in ("clean", *ATTACKS):
        assert run.data.metrics[f"fast.{row}_accuracy"] == pytest.approx(fast["results"][row]["accuracy"])
    curve = client.get_metric_history(run.info.run_id, "fast.pgd50_accuracy_by_restart")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [1, 2, 3]
    assert {"robust.md", "robust.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    (train_run,) = all_runs(store, "robust-train")  # trained through the checkpoint cache
    assert train_run.data.tags["checkpoint_hash"] == fast["checkpoint_hash"]


@pytest.fixture
def one_thread():
    """One intra-op thread: several times faster than two for these small batches on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_restarts_on_the_survivors_equal_every_restart_on_every_image(produced, one_thread):
    _, outputs, _ = produced
    model = load_classifier(_record(outputs)["recipes"]["fast"]["checkpoint"]).requires_grad_(False)
    x, y = _test_images(200)
    hyper = {"norm": "linf", "alpha": 0.01, "steps": 2, "random_start": True}
    s = {"function": "pipeline.attacks.pgd", "eps": 0.3, "restarts": 4, "batch_size": 64, **hyper}
    seeds = torch.arange(len(x))
    robust, per_restart = surviving(model, x, y, bind(model, s), 4, seeds=seeds, stride=10_000, batch=64)
    # the reference: every restart on every image, an image robust if no restart fools it
    everyone = predict(model, x) == y
    for restart in range(4):
        adv = pgd(model, x, y, 0.3, **hyper, restarts=1, seeds=seeds + restart * 10_000)
        everyone &= predict(model, adv) == y
    assert torch.equal(robust, everyone)
    assert per_restart[-1] == everyone.float().mean().item()
    assert per_restart == sorted(per_restart, reverse=True)
    assert per_restart[0] > per_restart[-1]  # the restarts matter on this model
    with CoreSplit(2) as split:  # cpu_workers changes no number
        split_robust, _ = surviving(model, x, y, bind(model, s), 4, seeds=seeds, stride=10_000, split=split)
    assert torch.equal(split_robust, robust)


def _test_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.data.mnist import MNISTData

    data = MNISTData(str(DATA_ROOT))
    data.setup()
    images, labels = data.test_set.tensors
    return images[:n], labels[:n]


def test_recipes_swap_config_groups():
    cfg = make_config(
        ["recipes=[fast,fgsm_rs,pgd,trades]", 'every_recipe=["train.epochs=2"]', "seed=3"], name="robust"
    )
    assert selected(cfg) == ["fast", "fgsm_rs", "pgd", "trades"]
    fast, wong, madry, trades = (recipe_config(cfg, name) for name in selected(cfg))
    assert (fast.model.name, fast.train.name, fast.train.method, fast.train.steps) == (
        "cnn",
        "adversarial",
        "pgd",
        3,
    )
    assert (wong.train.method, wong.train.steps) == ("fgsm_rs", 1)
    assert (madry.model.name, madry.model.net.hidden, madry.train.method) == ("madry_cnn", 1024, "pgd")
    assert madry.train.steps == 10 and madry.model.net.padding == 2
    assert (trades.train.name, trades.train.beta) == ("trades", 6.0)
    assert {c.train.epochs for c in (fast, wong, madry, trades)} == {2}  # every_recipe comes last
    assert {c.seed for c in (fast, madry, trades)} == {3} and fast.tracking.experiment == "robust"
    settings = settings_of(cfg, 10_000)
    assert settings["n"] == 10_000 and settings["pgd40"]["steps"] == 40  # conf/attack/pgd.yaml's
    assert (settings["pgd50"]["steps"], settings["pgd50"]["restarts"]) == (50, 10)
    assert all(settings[a]["eps"] == 0.3 for a in ATTACKS)
    with pytest.raises(ConfigError, match="sets one of seed"):
        recipe_config(make_config(['recipe_overrides.fast=["seed=1"]'], name="robust"), "fast")
    with pytest.raises(ConfigError, match="n=0 must be an integer from 1 to 10000"):
        settings_of(make_config(["n=0"], name="robust"), 10_000)


def test_every_published_column(produced):
    _, outputs, _ = produced
    record = _record(outputs)
    fast = {**record["recipes"]["fast"], "paper": PAPERS["pgd"]}
    recipes = {"fast": fast, "trades": {**fast, "paper": PAPERS["trades"]}}
    lines = table(recipes, record["settings"]).splitlines()
    assert lines[0].split("|")[2:-1] == [
        " fast (ours) ",
        " trades (ours) ",
        " Madry et al. 2018 ",
        " Wong et al. 2020 (fast FGSM) ",
        " TRADES (Zhang et al. 2019) ",
    ]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert rows["clean"][2:] == ["98.53%", "98.50%", "99.48%"]
    assert rows["AutoAttack (quick, first 50 images)"][2:] == ["88.50%", "82.93%", "92.81%"]
    assert rows["PGD-8 × 2 restarts, step 0.01"][2] == "89.62% (× 50 restarts)"
    assert rows["PGD-5, step 0.01"][4] == "96.07%"
    assert rows["epochs"][2:] == ["~83 (100,000 steps)", "10", "100"]


def test_an_unknown_recipe_is_one_line(store, tmp_path):
    printed, errors, code = _run([f"paths.outputs={tmp_path}", "recipes=[fast,nosuch]"])
    assert code == 2
    (line,) = errors.strip().splitlines()
    assert line.startswith("error: recipes: unknown recipe 'nosuch'; choose from fast, fgsm_rs, pgd, trades")
    _, errors, code = _run([f"paths.outputs={tmp_path}", "train.epochs=1"])
    assert code == 2 and errors.strip().splitlines() == [
        "error: 'train.epochs=1' changes nothing here: each recipe sets its own training and model; "
        "pass 'every_recipe=[\"train.epochs=1\"]' (all recipes) or edit recipe_overrides in conf/robust.yaml"
    ]
    assert not (tmp_path / "mlflow.db").exists()  # failed before touching the store
