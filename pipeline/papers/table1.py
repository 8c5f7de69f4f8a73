"""`python -m pipeline.papers.table1`: Szegedy et al. 2013, Table 1, beside ours.

Reads the latest `experiment=szegedy_table1` sweep from the MLflow store, prints test error and
average minimum distortion (sqrt(sum r² / n), n = 784, over successful adversarials) per model
next to the paper's, and logs the table to that sweep's parent run as `table1.md`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.cli import entrypoint, exit_on_user_error
from pipeline.config import CONFIG_DIR
from pipeline.errors import PipelineError
from pipeline.tracking.store import Tracker

# model option → (paper's name, test error %, average minimum distortion) as published
PAPER = {
    "fc10_1e-4": ("FC10(1e-4)", 7.4, 0.062),
    "fc10_1e-2": ("FC10(1e-2)", 9.4, 0.1),
    "fc10_1": ("FC10(1)", 20.0, 0.14),
    "fc100_100": ("FC100-100-10", 1.64, 0.058),
    "fc200_200": ("FC200-200-10", 1.54, 0.065),
}
EXPERIMENT = "experiment=szegedy_table1"


def latest_sweep(tracker: Tracker, experiment: str):
    """The newest parent run of a `experiment=szegedy_table1` sweep, and its child runs."""
    parents = tracker.find_runs(experiment, stage="sweep")  # newest first
    parent = next((r for r in parents if EXPERIMENT in r.data.params.get("sweep.overrides", "")), None)
    if parent is None:
        raise PipelineError(
            f"no {EXPERIMENT} sweep in {tracker.uri}; run "
            f"`python -m pipeline {EXPERIMENT} -m` (or `make table1`) first"
        )
    return parent, [
        r for r in tracker.children(experiment, parent.info.run_id) if r.info.status == "FINISHED"
    ]


def table(children) -> str:
    rows = {r.data.params["model.name"]: r for r in children}
    lines = [
        "| model | test error (paper) | test error (ours) | avg. min. distortion (paper) "
        "| avg. min. distortion (ours) | success (ours) | images |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for option, (name, error, distortion) in PAPER.items():
        run = rows.get(option)
        if run is None:
            lines.append(f"| {name} | {error:.2f}% | – | {distortion:.3f} | – | – | – |")
            continue
        ours_error = 100 * (1 - float(run.data.tags["model.test_accuracy"]))
        m = run.data.metrics
        lines.append(
            f"| {name} | {error:.2f}% | {ours_error:.2f}% | {distortion:.3f} | "
            f"{m['szegedy_distortion_mean']:.3f} | {m['success_rate']:.1%} | "
            f"{run.data.params['n_eval']} |"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    tracker = Tracker.connect(cfg.tracking)
    parent, children = latest_sweep(tracker, cfg.tracking.experiment)
    text = table(children)
    commit = parent.data.tags.get("git_commit", "unknown")[:10]
    note = (
        f"Szegedy et al. 2013, Table 1, beside this pipeline (sweep run {parent.info.run_id}, "
        f"commit {commit}); our models are trained differently (Adam, ReLU, 4 epochs), so "
        "compare the trends, not the digits."
    )
    tracker.log_text(parent.info.run_id, f"{note}\n\n{text}\n", "table1.md")
    print(f"{note}\n\n{text}")


if __name__ == "__main__":
    entrypoint(main)
