"""`python -m pipeline.bench.memory [overrides]` (`make memory`): run a fresh 5-point FGSM sweep
on 5000 test images in one process and print each job's resident memory at its end (`rss_mb`)
and its peak (`peak_rss_mb`), read back from the sweep's MLflow runs. Flat numbers from the
second job on mean nothing piles up between jobs."""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir

from pipeline.__main__ import main
from pipeline.cli import entrypoint
from pipeline.config import CONFIG_DIR
from pipeline.tracking.store import Tracker

SWEEP = [
    "attack=fgsm",
    "eps=0.02,0.04,0.06,0.08,0.1",
    "n_eval=5000",
    "resume=false",
    "trainer.enable_progress_bar=false",
]


def report() -> None:
    overrides = sys.argv[1:]
    sys.argv = ["pipeline", *SWEEP, *overrides, "-m"]
    entrypoint(main)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[o for o in overrides if "," not in o])
    tracker = Tracker(cfg.tracking.uri)
    parent = tracker.find_runs(cfg.tracking.experiment, stage="sweep")[0]  # the one just run
    kids = sorted(
        tracker.children(cfg.tracking.experiment, parent.info.run_id), key=lambda r: r.info.start_time
    )
    print(
        f"\nsweep {parent.info.run_id}\n\n| job | eps | rss at end (MiB) | peak during job (MiB) |\n"
        "|---|---|---|---|"
    )
    for number, kid in enumerate(kids):
        metrics = kid.data.metrics
        print(
            f"| {number} | {kid.data.params['eps']} | {metrics['rss_mb']:.0f} | "
            f"{metrics['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    report()
