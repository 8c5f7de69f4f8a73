"""A multirun's parent MLflow run: checked and created before the jobs, resumed when the same
sweep is typed again, summarised and closed after the jobs.

Jobs find the parent through the ADVEX_PARENT_RUN_ID environment variable and tag their runs
with their config hash (`pipeline.config.config_hash`); a resumed sweep's job whose hash already
has a FINISHED run under the parent is skipped (`pipeline.run`).
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Mapping
from typing import Any, cast

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from pipeline.config import check_devices, config_hash, sweep_key, validate
from pipeline.errors import PipelineError
from pipeline.tracking import ui
from pipeline.tracking.figures import metric_curves
from pipeline.tracking.store import PARENT_ENV, SWEPT_ENV, Tracker

SUMMARY_PLOTS = {  # parent artifact → metrics drawn against the swept value
    "summary_success_accuracy.png": ("success_rate", "adv_accuracy"),
    "summary_l2.png": ("l2_mean",),
}
STALE = "its process ended without closing the run (killed); the sweep was resumed"
# Hydra's default sweeper as its config names it: only its points are known before the jobs run
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
JOB_TAG = "job."  # job.<number> on the parent: COMPLETED or FAILED: <error>, written by each job


def swept_keys(overrides: list[str], sweeper_params: Mapping[str, Any] | None = None) -> list[str]:
    """Keys a multirun sweeps over: ['eps'] for `attack=fgsm eps=0.05,0.1,0.2`, plus those of
    `hydra.sweeper.params` (set by experiment configs) that the command line did not set."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    given = {o.key_or_group for o in parsed}
    return keys + [key for key in (sweeper_params or {}) if key not in given]


def _as_number(value: str | None) -> float | None:
    try:
        return float(cast(str, value))  # None raises TypeError, caught below
    except (TypeError, ValueError):
        return None


def param(run, key: str) -> str | None:
    """A run's value of a swept key: its param, or `<group>.name` for a config group (attack=...)."""
    return run.data.params.get(key, run.data.params.get(f"{key}.name"))


def param_name(run, key: str) -> str:
    return key if key in run.data.params else f"{key}.name"


def x_axis(runs: list, swept: list[str]) -> tuple[str, bool]:
    """The key the sweep's results are drawn against: the first swept key whose values are all
    numbers (else the first key), and whether it is numeric."""
    numeric = [k for k in swept if all(_as_number(param(r, k)) is not None for r in runs)]
    return (numeric or swept)[0], bool(numeric)


def series_label(run, swept: list[str], x_key: str) -> str:
    """The line a run belongs to: the values of the swept keys other than x ("" if none)."""
    return " ".join(f"{k}={param(run, k)}" for k in swept if k != x_key)


def sweep_series(runs: list, swept: list[str], metrics: tuple[str, ...]) -> tuple[str, dict]:
    """{metric: {line label: (xs, ys)}} against the first numeric swept key (else the first key),
    one line per combination of the other swept values."""
    x_key, numeric = x_axis(runs, swept)
    series: dict[str, dict] = {metric: {} for metric in metrics}
    for run in sorted(runs, key=lambda r: _as_number(param(r, x_key)) or str(param(r, x_key))):
        x = _as_number(param(run, x_key)) if numeric else param(run, x_key)
        for metric in metrics:
            if metric in run.data.metrics:
                xs, ys = series[metric].setdefault(series_label(run, swept, x_key), ([], []))
                xs.append(x)
                ys.append(run.data.metrics[metric])
    return x_key, series


def planned_jobs(config: DictConfig) -> list[DictConfig] | None:
    """The composed config of every point of a multirun, as Hydra's basic sweeper will make them:
    the product of the swept values, a key given twice taking its last value (None under another
    sweeper, whose points are not known in advance)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    loader = GlobalHydra.instance().config_loader()
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    choices: dict[str, list[str]] = {}
    for override in OverridesParser.create(config_loader=loader).parse_overrides(
        params + list(config.hydra.overrides.task)
    ):
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:  # e.g. interval(0,1): the basic sweeper rejects it with its own message
            return None
    return [loader.load_sweep_config(config, list(point)) for point in itertools.product(*choices.values())]


def preflight(jobs: list[DictConfig]) -> None:
    """Check every point's values before the first job starts: a typo in the last value of a
    sweep should not wait for the others to finish."""
    for number, job in enumerate(jobs, 1):
        try:
            validate(job)
            check_devices(job, multirun=True)
        except PipelineError as error:
            raise type(error)(f"{error} (sweep point {number} of {len(jobs)}; no job was started)") from error


def _alive(tags: Mapping[str, str]) -> bool:
    """Whether the process that opened a parent run still runs (on this machine)."""
    if tags.get("sweep.host") != socket.gethostname() or not tags.get("sweep.pid", "").isdigit():
        return False
    pid = int(tags["sweep.pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Sweep:
    """A multirun's parent run. With `resume`, the newest parent of the same sweep (same
    overrides, run-control ones aside) is reopened instead of a new one."""

    open: list[Sweep] = []

    def __init__(
        self,
        tracker: Tracker,
        experiment: str,
        overrides: list[str],
        sweeper_params: Mapping[str, Any] | None = None,
        *,
        resume: bool = False,
        planned: list[str] | None = None,
    ) -> None:
        self.tracker, self.experiment = tracker, experiment
        self.swept = swept_keys(overrides, sweeper_params)
        self.jobs = self.failed_jobs = self.skipped = 0
        self.name = "sweep " + " ".join(overrides)
        self.view_url: str | None = None
        key = sweep_key(overrides)
        earlier = tracker.find_runs(experiment, **{"sweep.key": key, "stage": "sweep"}) if resume else []
        if earlier:
            self.run_id, self.name = earlier[0].info.run_id, earlier[0].info.run_name
            self._resume(earlier[0], planned)
        else:
            self.run_id = tracker.start_run(
                experiment,
                self.name,
                params={"sweep.overrides": " ".join(overrides)},
                tags={"sweep.swept_keys": ",".join(self.swept), "stage": "sweep", "sweep.key": key},
            )
        tracker.set_tags(self.run_id, {"sweep.host": socket.gethostname(), "sweep.pid": str(os.getpid())})
        os.environ[PARENT_ENV] = self.run_id
        os.environ[SWEPT_ENV] = ",".join(self.swept)
        Sweep.open.append(self)

    def _resume(self, parent, planned: list[str] | None) -> None:
        if parent.info.status == "RUNNING" and _alive(parent.data.tags):
            pid = parent.data.tags["sweep.pid"]
            raise PipelineError(
                f"this sweep (run {self.run_id}) is still running in process {pid}; "
                "wait for it, stop it, or pass resume=false to start a separate sweep"
            )
        for key in parent.data.tags:  # the outcomes of the earlier attempt's jobs
            if key.startswith(JOB_TAG):
                self.tracker.client.delete_tag(self.run_id, key)
        children = self.tracker.children(self.experiment, self.run_id)
        for child in children:
            if child.info.status == "RUNNING":  # its process is gone: it was killed
                self.tracker.end_run(child.info.run_id, "KILLED", STALE)
        done = {c.data.tags.get("config_hash") for c in children if c.info.status == "FINISHED"}
        self.tracker.reopen(self.run_id)
        if planned is None:
            self.skipped = len(done)
            print(
                f"resuming sweep {self.run_id}: points with a finished run ({len(done)}) are skipped "
                "(resume=false starts afresh)"
            )
        else:
            self.skipped = sum(digest in done for digest in planned)
            print(
                f"resuming sweep {self.run_id}: {self.skipped} of {len(planned)} points already done "
                "(resume=false starts afresh)"
            )

    def finish(self, status: str = "FINISHED", error: BaseException | None = None) -> None:
        """Count the jobs' outcomes (tags the jobs wrote, wherever they ran), plot, close."""
        Sweep.open.remove(self)
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        try:
            self._summarise()
        finally:
            failed = status == "FINISHED" and self.failed_jobs
            self.tracker.end_run(self.run_id, "FAILED" if failed else status, error)
        if self.view_url:
            hint = " (start it with `make ui`)" if self.tracker.ui == ui.LOCAL_UI else ""
            print(f"compare the sweep in the MLflow UI{hint}: {self.view_url}")

    def finish_if_open(self) -> None:
        if self in Sweep.open:
            self.finish()

    def _summarise(self) -> None:
        outcomes = [
            value
            for key, value in self.tracker.client.get_run(self.run_id).data.tags.items()
            if key.startswith(JOB_TAG)
        ]
        self.jobs += len(outcomes)
        self.failed_jobs += sum(value.startswith("FAILED") for value in outcomes)
        runs = [r for r in self.tracker.children(self.experiment, self.run_id) if r.info.status == "FINISHED"]
        self.tracker.log_metrics(
            self.run_id,
            {
                "jobs": self.jobs,
                "jobs_failed": self.failed_jobs,
                "jobs_skipped": self.skipped,
                "children_finished": len(runs),
            },
        )
        if not runs:
            return
        try:
            self.view_url = self._publish_view(runs)
        except Exception as error:  # the results are all logged; only the UI view is missing
            print(f"warning: could not save the sweep's MLflow UI view ({error})")
        if not self.swept:
            return
        drawn = {}
        for artifact, metrics in SUMMARY_PLOTS.items():
            x_key, series = sweep_series(runs, self.swept, metrics)
            self.tracker.log_figure(self.run_id, metric_curves(x_key, series, "sweep summary"), artifact)
            drawn.update(
                {
                    metric: {label or "all": {x_key: xs, metric: ys} for label, (xs, ys) in lines.items()}
                    for metric, lines in series.items()
                }
            )
        self.tracker.log_dict(self.run_id, drawn, "summary_series.json")  # the plotted lines
        self.tracker.log_dict(
            self.run_id,
            [
                {
                    "run_id": r.info.run_id,
                    "run_name": r.info.run_name,
                    "params": {k: r.data.params.get(k) for k in self.swept},
                    "metrics": r.data.metrics,
                }
                for r in runs
            ],
            "sweep_summary.json",
        )

    def _publish_view(self, runs: list) -> str:
        """Save the sweep's comparison as a view named like the parent run (a resumed sweep
        updates it) and return its link. A numeric swept value is also logged as a metric of the
        runs that lack one, so the UI sorts and draws it as a number; with more than one swept
        key each series (attack=pgd, ...) gets its own run colour."""
        metrics = set().union(*(r.data.metrics for r in runs))
        x = None
        if self.swept:
            x_key, numeric = x_axis(runs, self.swept)
            if numeric:
                for run in runs:
                    if x_key not in run.data.metrics:
                        value = param(run, x_key)
                        assert value is not None  # numeric: every run has a number for x_key
                        self.tracker.log_metrics(run.info.run_id, {x_key: float(value)})
                metrics.add(x_key)
                x = (x_key, "METRIC")
            else:
                x = (param_name(runs[0], x_key), "PARAM")
            labels = {r.info.run_id: series_label(r, self.swept, x_key) for r in runs}
            colours = ui.series_colours(labels.values())
            if len(colours) > 1:
                for run_id, label in labels.items():
                    self.tracker.set_tags(run_id, {"mlflow.runColor": colours[label]})
        state = ui.sweep_view(self.run_id, x, [param_name(runs[0], k) for k in self.swept], metrics)
        url = self.tracker.save_view(self.experiment, ui.SWEEP_VIEW + self.run_id, self.name, state)
        self.tracker.set_tags(self.run_id, {"sweep.view_url": url})
        return url


def open_sweep(config: DictConfig) -> Sweep:
    """Check every planned point, then open (or resume) the multirun's parent run."""
    jobs = planned_jobs(config)
    if jobs is not None:
        preflight(jobs)
    return Sweep(
        Tracker.connect(config.tracking),
        config.tracking.experiment,
        list(config.hydra.overrides.task),
        config.hydra.sweeper.get("params"),
        resume=config.resume,
        planned=None if jobs is None else [config_hash(j) for j in jobs],
    )


def record_job(config: DictConfig, outcome: str) -> None:
    """Tag the parent run with a job's outcome. This runs where the job ran (a launcher's worker
    process, too), so it goes through the store, not through the parent's Sweep object."""
    parent = os.environ.get(PARENT_ENV)
    if parent is not None:
        tracker = Tracker.connect(config.tracking)  # waits for a restarting server
        tracker.set_tags(parent, {f"{JOB_TAG}{config.hydra.job.num}": outcome})


def finish_open_sweeps(status: str, error: BaseException | None = None, job_failed: bool = False) -> None:
    """Close every parent run still open (on an error that escaped the sweep; `job_failed`: it
    escaped from a job, which Hydra then did not count)."""
    for sweep in list(Sweep.open):
        sweep.jobs += job_failed
        sweep.failed_jobs += job_failed
        sweep.finish(status, error)
