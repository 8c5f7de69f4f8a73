"""`python -m pipeline.bench.launchers [overrides]` (`make launchers`): wall time of one FGSM sweep
(6 eps values, 5000 test images each) run by Hydra's basic launcher (one job after another) and
by the joblib launcher with 2 worker processes, each a fresh process and a fresh MLflow store,
attacking the same already-trained checkpoint; then one job's attack step on 1 device against
2 DDP ranks (`trainer.devices=2 trainer.strategy=ddp`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from pipeline.config import PROJECT_ROOT
from pipeline.tracking.store import Tracker

SWEEP = ["attack=fgsm", "eps=0.02,0.04,0.06,0.08,0.1,0.2", "n_eval=5000", "trainer.enable_progress_bar=false"]
LAUNCHERS = {"basic": [], "joblib, 2 workers": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]}
STEPS = {
    "FGSM, 5000 images": ["attack=fgsm", "n_eval=5000"],
    "PGD-10, 2000 images": ["attack=pgd", "attack.steps=10", "n_eval=2000"],
}
RANKS = {
    "1 device (cpu_workers=auto)": ["trainer.devices=1"],
    "2 DDP ranks (cpu_workers=1 each)": ["trainer.devices=2", "trainer.strategy=ddp", "cpu_workers=1"],
}


def _pipeline(args: list[str], store: str) -> float:
    """Wall time of `python -m pipeline <args>` in a fresh process writing to `store`."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
    )
    return time.perf_counter() - start


def _attack_step_seconds(args: list[str]) -> tuple[float, float]:
    """`seconds_attack_step` of one run (the whole test loop: the other ranks' start-up, clean
    pass, attack, evaluation) and `attack_seconds` (generating the adversarials, slowest rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        _pipeline([*args, "trainer.enable_progress_bar=false"], store)
        (run,) = Tracker(store).find_runs("mnist", stage="attack")
        return run.data.metrics["seconds_attack_step"], run.data.metrics["attack_seconds"]


def main() -> None:
    extra = sys.argv[1:]
    subprocess.run(
        [sys.executable, "-m", "pipeline.train", *extra], cwd=PROJECT_ROOT, check=True, capture_output=True
    )  # cached after the first call: no run trains below
    print(f"| launcher | wall time of `{' '.join(SWEEP)}` (s) |\n|---|---|")
    seconds = {}
    for name, launcher in LAUNCHERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            seconds[name] = _pipeline([*SWEEP, *launcher, *extra, "-m"], f"sqlite:///{tmp}/mlflow.db")
        print(f"| {name} | {seconds[name]:.1f} |", flush=True)
    basic, parallel = seconds.values()
    print(f"\nspeed-up of joblib with 2 workers: {basic / parallel:.2f}x on {os.cpu_count()} cores")

    print(
        f"\n| attack step (test loop / adversarial generation) | {' | '.join(RANKS)} | speed-up |"
        "\n|---|---|---|---|"
    )
    for name, step in STEPS.items():
        (one, gen_one), (two, gen_two) = (
            _attack_step_seconds([*step, "trainer.accelerator=cpu", *ranks, *extra])
            for ranks in RANKS.values()
        )
        print(
            f"| {name} | {one:.2f} s / {gen_one:.2f} s | {two:.2f} s / {gen_two:.2f} s | "
            f"{one / two:.2f}x / {gen_one / gen_two:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
