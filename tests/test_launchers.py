"""Hydra launchers from the command line: parallel jobs (joblib) and submitit's local executor
attach to the one parent run, train a shared checkpoint once, and their outcomes are counted."""

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, all_runs, small_overrides
from tests.test_cli import sweep_children


def _sweep(args, store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    return subprocess.run([sys.executable, "-m", "pipeline", *args, *small_overrides(tmp_path),
                           "n_eval=100", "-m"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_joblib_runs_points_in_parallel_under_one_parent(mnist_root, store, tmp_path):
    # two points fail inside their job (no such checkpoint), four train-or-reuse and attack
    done = _sweep(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "eps=0.1,0.2",
                   "checkpoint=/no/such/model.ckpt,null", "seed=0,1"], store, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    (parent,), children = sweep_children(store)
    kids = children[parent.info.run_id]
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["jobs"] == 8 and parent.data.metrics["jobs_failed"] == 4
    points = sorted((k.data.params["eps"], k.data.params["seed"]) for k in kids)
    assert points == [("0.1", "0"), ("0.1", "1"), ("0.2", "0"), ("0.2", "1")]
    assert all(k.info.status == "FINISHED" for k in kids)
    failures = [v for k, v in parent.data.tags.items() if k.startswith("job.") and v.startswith("FAILED")]
    assert len(failures) == 4 and all("does not exist" in v for v in failures)
    trained = [r for r in all_runs(store) if r.data.tags.get("stage") == "train"]
    assert len(trained) == 2  # one per seed, though two jobs of each seed ran at once


@pytest.mark.slow
def test_submitit_local_jobs_attach_to_the_parent(mnist_root, store, tmp_path):
    done = _sweep(["hydra/launcher=submitit_local", "eps=0.1,0.2"], store, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,), children = sweep_children(store)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 2
    assert sorted(k.data.params["eps"] for k in children[parent.info.run_id]) == ["0.1", "0.2"]
