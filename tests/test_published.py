"""`python -m pipeline.papers.published`: published MNIST numbers beside ours, on a tiny CNN, few images."""

import json
import math
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.attacks import bim, fgsm
from pipeline.cli import entrypoint
from pipeline.errors import ConfigError
from pipeline.metrics import linf
from pipeline.papers.published import (
    ROWS,
    SECTIONS,
    _settings,
    bim_smallest,
    eps_grid,
    fgsm_smallest,
    measure,
    over_targets,
    predict,
    produce,
    report_text,
)
from pipeline.papers.published import main as published_main
from tests.conftest import all_runs, attack_params, make_config, small_overrides

# every measurement on a few images with few steps: seconds on a tiny CNN
TINY = [
    "cw.n=2",
    "cw.steps=40",
    "cw.lr=0.1",
    "cw.binary_steps=2",
    "cw.c_init=1.0",
    "deepfool.n=40",
    "lbfgs.n=8",
    "lbfgs.c_steps=4",
    "lbfgs.max_iter=30",
    "fgsm.n=40",
    "fgsm.eps_step=0.02",
    "bim.n=3",
    "bim.steps=10",
    "bim.bisection_steps=5",
]


def _tiny_settings(*extra: str) -> dict:
    return _settings(make_config([*TINY, *extra], name="published"), 10_000)


@pytest.fixture(scope="module")
def measured(tiny_cnn):
    model, x, y = tiny_cnn
    settings = _tiny_settings()
    return settings, measure(model, x, y, settings, split=None, log=lambda line: None)


def test_every_measurement_gives_finite_sensible_numbers(measured):
    settings, results = measured
    assert set(results) == set(SECTIONS)
    for name, numbers in results.items():
        assert all(math.isfinite(v) for v in numbers.values()), (name, numbers)
        assert 0 < numbers["images"] <= numbers["n"] == settings[name]["n"]
        assert 0 < numbers["success_rate"] <= 1 and numbers["seconds"] > 0
    for name, key in (("cw", "l2"), ("bim", "linf")):
        numbers = results[name]
        assert 1 <= numbers["complete_images"] <= numbers["images"]
        best, average, worst = (numbers[f"{key}_{case}"] for case in ("best", "average", "worst"))
        assert 0 < best <= average <= worst, (name, numbers)
    assert results["bim"]["linf_worst"] <= settings["bim"]["eps_max"]
    for name in ("deepfool", "lbfgs", "fgsm"):
        assert results[name]["rho_adv"] > 0 and results[name]["l2_mean"] > 0
    assert results["deepfool"]["success_rate"] == 1
    # FGSM's smallest fooling step moves every pixel: far more L2 than the minimal attacks
    assert results["fgsm"]["rho_adv"] > results["deepfool"]["rho_adv"]
    assert results["fgsm"]["rho_adv"] > results["lbfgs"]["rho_adv"]
    assert 0 < results["fgsm"]["eps_mean"] <= settings["fgsm"]["eps_max"]


def test_the_table_puts_every_published_number_beside_ours(measured):
    settings, results = measured
    text = report_text(results, settings, "cnn", {"test_accuracy": 0.95}, "0123456789abcdef")
    assert "models differ" in text and "commit 0123456789" in text and "95.00%" in text
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(ROWS)  # header, separator, one row per published number
    assert all(row.count("|") == 9 for row in rows)
    for row, (paper, attack, _, published, section, keys) in zip(rows[2:], ROWS, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == paper and cells[1] == attack
        assert [float(v) for v in cells[3].split(" / ")] == list(published)
        ours = [float(v) for v in cells[4].split(" / ")]
        assert ours == pytest.approx([results[section][k] for k in keys], abs=5e-4)
    assert "Settings:" in text and "10,000" in text  # the C&W step count against the paper's
    skipped = report_text({k: v for k, v in results.items() if k != "bim"}, settings, "cnn", {}, "unknown")
    (bim_row,) = [line for line in skipped.splitlines() if line.startswith("|") and "bim" in line]
    assert "not measured" in bim_row


def test_best_average_worst_are_over_the_images_with_every_target(measured):
    distance = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.5, 0.5, 9.0])
    success = torch.tensor([True, True, True, True, False, True, True, True, True])
    out = over_targets(distance, success, 3, "l2")  # image 1 missed a target: left out
    assert out["complete_images"] == 2 and out["success_rate"] == pytest.approx(8 / 9)
    assert out["l2_best"] == pytest.approx((1 + 0.5) / 2)
    assert out["l2_average"] == pytest.approx((2 + 10 / 3) / 2)
    assert out["l2_worst"] == pytest.approx((3 + 9) / 2)


def test_fgsm_takes_the_smallest_fooling_eps_of_the_grid(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:20], y[:20]
    grid = eps_grid({"eps_step": 0.02, "eps_max": 0.6})
    adv, eps = fgsm_smallest(model, x, y, grid)
    found = ~eps.isnan()
    assert found.any()
    assert (predict(model, adv[found]) != y[found]).all()
    assert torch.allclose(linf(adv[found] - x[found]), eps[found], atol=1e-6)
    for i in found.nonzero()[:5, 0].tolist():  # one grid step less does not fool it
        if eps[i] > grid[0] + 1e-9:
            k = min(range(len(grid)), key=lambda j: abs(grid[j] - eps[i].item()))
            below = fgsm(model, x[i : i + 1], y[i : i + 1], eps=grid[k - 1])
            assert predict(model, below).item() == y[i].item()


def test_bim_bisection_stays_within_each_images_radius(tiny_cnn):
    model, x, y = tiny_cnn
    x, y = x[:6], y[:6]
    radius = torch.linspace(0.05, 0.3, 6).view(-1, 1, 1, 1)  # bim takes one radius per image
    adv = bim(model, x, y, eps=radius, **attack_params("bim", steps=5), targeted=True, target=(y + 1) % 10)
    assert (linf(adv - x) <= radius.flatten() + 1e-6).all()
    distance, success = bim_smallest(
        model, x, y, (y + 1) % 10, {"eps_max": 0.5, "bisection_steps": 4, "steps": 5, "alpha_scale": 2.5}
    )
    assert success.any()
    assert (distance[success] > 0).all() and (distance[success] <= 0.5 + 1e-6).all()
    assert torch.isinf(distance[~success]).all()


def test_bad_image_counts_are_one_line_errors(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["published", f"paths.outputs={tmp_path}", "cw.n=-1"])
    with pytest.raises(SystemExit) as exit_info:
        entrypoint(published_main)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "error: cw.n=-1 must be an integer from 0 (skip) to 10000"
    assert all_runs(store) == []
    with pytest.raises(ConfigError, match="fgsm.n=10001"):
        _tiny_settings("fgsm.n=10001")


def test_produce_trains_logs_writes_and_prints(mnist_root, store, tmp_path, capsys):
    cfg = make_config(
        small_overrides(
            tmp_path,
            "train.n_train=512",
            "cw.n=1",
            "cw.steps=40",
            "cw.lr=0.1",
            "cw.binary_steps=2",
            "cw.c_init=1.0",
            "deepfool.n=20",
            "lbfgs.n=4",
            "lbfgs.c_steps=3",
            "lbfgs.max_iter=20",
            "fgsm.n=20",
            "fgsm.eps_step=0.05",
            "bim.n=0",
        ),
        name="published",
    )
    report = produce(cfg)
    printed = capsys.readouterr().out
    assert report["text"] in printed and "not measured" in report["text"]
    md, js = report["paths"]
    assert md.parent == tmp_path / "published" and md.read_text() == report["text"]
    saved = json.loads(js.read_text())
    assert set(saved["results"]) == {"cw", "deepfool", "lbfgs", "fgsm"}
    assert saved["settings"]["bim"]["n"] == 0

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("published").experiment_id])
    assert run.info.run_id == report["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "published" and run.data.params["model.name"] == "cnn"
    assert run.data.params["cw.steps"] == "40" and run.data.params["bim.n"] == "0"
    assert {"deepfool.rho_adv", "fgsm.rho_adv", "lbfgs.rho_adv", "seconds"} <= set(run.data.metrics)
    assert not any(key.startswith("bim.") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"published.md", "published.json"} <= artifacts
    assert client.get_experiment_by_name("published-train") is not None  # trained it first
