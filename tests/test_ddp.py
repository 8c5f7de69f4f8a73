"""The attack step over 2 ranks (`trainer.devices=2 trainer.strategy=ddp`, gloo on CPU) gives the
single-device run's numbers on the same images, and only rank 0 talks to MLflow."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT, all_runs, small_overrides

PER_RUN = {
    "attack_seconds",
    "images_per_second",
    "seconds_setup",
    "seconds_attack_step",
    "seconds_tracking",
    "rss_mb",
    "peak_rss_mb",
}


@pytest.mark.slow
def test_two_ranks_give_the_single_device_numbers(mnist_root, store, tmp_path):
    common = [
        *small_overrides(tmp_path),
        "attack=pgd",
        "attack.steps=5",
        "n_eval=101",  # odd: padding
        "attack.batch_size=16",
        "trainer.accelerator=cpu",
        "cpu_workers=1",
    ]
    for devices in (1, 2):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *common, f"trainer.devices={devices}", "trainer.strategy=ddp"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": store},
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    runs = {
        r.data.params["trainer.devices"]: r for r in all_runs(store) if r.data.tags.get("stage") == "attack"
    }
    assert sorted(runs) == ["1", "2"]  # rank 1 opened no run of its own
    one, two = ({k: v for k, v in runs[d].data.metrics.items() if k not in PER_RUN} for d in ("1", "2"))
    # the ranks batch other images together, which moves logits by an ulp: confidences within 1e-6,
    # everything else (adversarials, predictions, success, norms, pass counts) exactly equal
    assert one == pytest.approx(two, rel=1e-6, abs=0)
    assert {k: v for k, v in one.items() if "confidence" not in k} == {
        k: v for k, v in two.items() if "confidence" not in k
    }
    client = MlflowClient(store)
    tables = [
        json.load(
            open(client.download_artifacts(runs[d].info.run_id, "per_image_eps0.1.json", str(tmp_path / d)))
        )
        for d in ("1", "2")
    ]
    columns = tables[0]["columns"]
    assert len(tables[0]["data"]) == len(tables[1]["data"]) == 101  # every image once, in order
    for row_one, row_two in zip(tables[0]["data"], tables[1]["data"], strict=True):
        for column, a, b in zip(columns, row_one, row_two, strict=True):
            assert a == (pytest.approx(b, rel=1e-6) if "confidence" in column else b), (row_one[0], column)
