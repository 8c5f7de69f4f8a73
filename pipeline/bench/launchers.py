"""`python -m pipeline.bench.launchers [overrides]` (`make launchers`): wall time of one FGSM sweep
(6 eps values, 5000 test images each) run by Hydra's basic launcher (one job after another) and
by the joblib launcher with 2 worker processes, each a fresh process and a fresh MLflow store,
attacking the same already-trained checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from pipeline.config import PROJECT_ROOT

SWEEP = ["attack=fgsm", "eps=0.02,0.04,0.06,0.08,0.1,0.2", "n_eval=5000",
         "trainer.enable_progress_bar=false"]
LAUNCHERS = {"basic": [], "joblib, 2 workers": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}


def _sweep(args: list[str], store: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", *args, "-m"], cwd=PROJECT_ROOT, check=True,
                   capture_output=True, env={**os.environ, "MLFLOW_TRACKING_URI": store})
    return time.perf_counter() - start


def main() -> None:
    extra = sys.argv[1:]
    subprocess.run([sys.executable, "-m", "pipeline.train", *extra], cwd=PROJECT_ROOT, check=True,
                   capture_output=True)  # cached after the first call: no run trains below
    print(f"| launcher | wall time of `{' '.join(SWEEP)}` (s) |\n|---|---|")
    seconds = {}
    for name, launcher in LAUNCHERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            seconds[name] = _sweep([*SWEEP, *launcher, *extra], f"sqlite:///{tmp}/mlflow.db")
        print(f"| {name} | {seconds[name]:.1f} |", flush=True)
    basic, parallel = seconds.values()
    print(f"\nspeed-up of joblib with 2 workers: {basic / parallel:.2f}x on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
