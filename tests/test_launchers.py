"""Hydra launchers from the command line: parallel jobs (joblib) and submitit's local executor
attach to the one parent run, train a shared checkpoint once, and their outcomes are counted."""

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, all_runs, make_config, small_overrides
from tests.test_cli import sweep_children


def _sweep(args, store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, *small_overrides(tmp_path), "n_eval=100", "-m"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_joblib_runs_points_in_parallel_under_one_parent(mnist_root, store, tmp_path):
    # two points fail inside their job (no such checkpoint); the other two start together and
    # both need the same checkpoint, which does not exist yet
    done = _sweep(
        [
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "checkpoint=null,/no/such/model.ckpt",
            "eps=0.1,0.2",
        ],
        store,
        tmp_path,
    )  # jobs 0 and 1: checkpoint=null, eps 0.1 and 0.2
    assert done.returncode == 2, done.stderr[-3000:]
    (parent,), children = sweep_children(store)
    kids = children[parent.info.run_id]
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["jobs"] == 4 and parent.data.metrics["jobs_failed"] == 2
    assert sorted(k.data.params["eps"] for k in kids) == ["0.1", "0.2"]
    assert all(k.info.status == "FINISHED" for k in kids)
    failures = [v for k, v in parent.data.tags.items() if k.startswith("job.") and v.startswith("FAILED")]
    assert len(failures) == 2 and all("does not exist" in v for v in failures)
    trained = [r for r in all_runs(store) if r.data.tags.get("stage") == "train"]
    assert len(trained) == 1  # trained once, though two jobs needed it at once


@pytest.mark.slow
def test_submitit_local_jobs_attach_to_the_parent(mnist_root, store, tmp_path):
    done = _sweep(["hydra/launcher=submitit_local", "eps=0.1,0.2"], store, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (parent,), children = sweep_children(store)
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs"] == 2
    assert sorted(k.data.params["eps"] for k in children[parent.info.run_id]) == ["0.1", "0.2"]


def test_slurm_preset_renders_the_sbatch_fields_users_set(tmp_path, monkeypatch):
    """hydra/launcher=slurm through submitit's own SLURM executor, as the plugin drives it, up to
    the sbatch script (a stand-in `srun` on PATH: submitit looks for one before anything else)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    cfg = make_config(
        ["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=64"], hydra=True
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path / "jobs", slurm_max_num_timeout=launcher["max_num_timeout"]
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            key if key in base else f"slurm_{key}": value
            for key, value in launcher.items()
            if key not in ("_target_", "submitit_folder", "max_num_timeout")
        }
    )
    script = executor._executor._make_submission_file_text("python -m pipeline", "0")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=240",
        "#SBATCH --cpus-per-task=8",
    ):
        assert line in script, line
