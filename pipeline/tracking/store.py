"""MLflow: the one place that talks to the tracking store.

Runs are driven through `MlflowClient` (no global "active run"), so a sweep's parent
run and its jobs' child runs can be opened and closed independently. A run that
ends with an exception is marked FAILED (KILLED on Ctrl-C) with the error as a tag,
never left RUNNING.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import matplotlib.pyplot as plt
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from omegaconf import DictConfig

from pipeline.config import PROJECT_ROOT
from pipeline.errors import Stopped, TrackingError
from pipeline.tracking import ui

for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.store.db.db_types"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

PARENT_ENV = "ADVEX_PARENT_RUN_ID"  # set while a sweep's parent run is open; jobs attach to it
SWEPT_ENV = "ADVEX_SWEPT_KEYS"  # ... and the keys it sweeps, comma-separated: jobs are named by them
_BATCH = 100  # MLflow's limit of params/tags per log_batch call


def _one_line(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error[:500]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


def _unreachable_reason(uri: str) -> str | None:
    """Why the tracking server at `uri` does not answer, or None when it does."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
    except urllib.error.HTTPError:
        return None  # something answers; let the client judge it
    except (OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
    return None


def _probe(uri: str, wait_s: float = 0) -> None:
    """Fail fast, with a fix, when the store cannot be reached or written. A server that does not
    answer is waited for up to `wait_s` seconds (it may be restarting)."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        reason = _unreachable_reason(uri)
        deadline = time.monotonic() + wait_s
        if reason is not None and wait_s > 0:
            print(f"waiting up to {wait_s:.0f} s for the MLflow tracking server {uri} ({reason})", flush=True)
        while reason is not None and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            reason = _unreachable_reason(uri)
        if reason is not None:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it "
                "(`make server`), fix MLFLOW_TRACKING_URI, or unset it to use outputs/mlflow.db"
            )
    elif scheme == "sqlite":
        directory = Path(uri.removeprefix("sqlite:///")).parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingError(
                f"cannot create {directory} for the MLflow store ({error}); "
                "pass a writable paths.outputs or set MLFLOW_TRACKING_URI"
            ) from error
        if not os.access(directory, os.W_OK):
            raise TrackingError(
                f"{directory} is not writable, so the MLflow store {uri} cannot "
                "be written; pass a writable paths.outputs or set MLFLOW_TRACKING_URI"
            )


def server_went_away(error: BaseException) -> bool:
    """Whether `error` (or its cause) is a request that never reached the tracking server."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, TrackingError) and error.gone:
            return True
        text = str(error)
        if isinstance(error, MlflowException) and ("Max retries exceeded" in text or "Connection" in text):
            return True
        if isinstance(error, ConnectionError):
            return True
        error = error.__cause__  # type: ignore[assignment]
    return False


def explain(error: BaseException, uri: str, experiment: str | None = None) -> TrackingError | None:
    """The one-line TrackingError for a refused login, a missing write permission or a server
    that went away; None for anything else."""
    if isinstance(error, TrackingError):
        return error
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    code = getattr(error, "error_code", None)
    if code == "UNAUTHENTICATED":
        if not user or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
            return TrackingError(
                f"MLflow tracking server {uri} requires a login; set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (an admin adds users: python -m pipeline.tracking.users add NAME)"
            )
        return TrackingError(
            f"MLflow tracking server {uri} refused the login of user '{user}' (wrong username or "
            "password); fix MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or ask an admin for a "
            f"new password (python -m pipeline.tracking.users password {user})"
        )
    if code == "PERMISSION_DENIED":
        name = experiment or "EXPERIMENT"
        return TrackingError(
            f"user '{user}' may not write to experiment '{name}' on {uri}; ask its owner or an admin "
            f"to run `python -m pipeline.tracking.users grant {user} {name} EDIT`, or pass "
            "tracking.experiment=NAME to log to an experiment of your own"
        )
    if urlparse(uri).scheme in ("http", "https") and server_went_away(error):
        found = re.search(r"\[Errno -?\d+\] [^'\")]+", str(error))
        return TrackingError(
            f"MLflow tracking server {uri} stopped answering ({found[0] if found else 'no answer'}); "
            "restart it and type the same command again: a sweep resumes with its finished points kept",
            gone=True,
        )
    return None


class _Denied(Exception):
    error_code = "PERMISSION_DENIED"


class _ExplainedClient:
    """An MlflowClient whose refused logins, missing permissions and lost connections raise a
    TrackingError with the fix."""

    def __init__(self, tracker: Tracker) -> None:
        self._client = MlflowClient(tracking_uri=tracker.uri)
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except MlflowException as error:
                explained = explain(error, self._tracker.uri, self._tracker.experiment)
                if explained is None:
                    raise
                raise explained from error

        return call


@functools.cache
def provenance_tags() -> dict[str, str]:
    """Git commit and library versions: what is needed to rerun a result exactly (read once
    per process)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(PROJECT_ROOT), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "unknown"

    commit = git("rev-parse", "HEAD")
    tags = {
        MLFLOW_GIT_COMMIT: commit,
        "git_commit": commit,
        "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))),
    }
    for package in ("torch", "torchvision", "pytorch-lightning", "mlflow", "hydra-core"):
        tags[f"version.{package}"] = version(package)
    return tags


_unclosed: list[tuple[str, str]] = []  # (run id, error) of runs that ended while the server was away


class Tracker:
    """A tracking store: experiments by name, runs with guaranteed end states, logging helpers."""

    def __init__(self, uri: str, artifact_root: str | None = None, ui_url: str | None = None) -> None:
        self.uri = uri
        self.experiment: str | None = None  # the experiment last named, for permission errors
        self.client = cast(MlflowClient, _ExplainedClient(self))
        local = urlparse(uri).scheme in ("sqlite", "")
        self.artifact_root = Path(artifact_root).resolve().as_uri() if artifact_root and local else None
        self.ui = ui.base_url(uri, ui_url)  # where the MLflow UI shows this store

    @classmethod
    def connect(cls, cfg: DictConfig) -> Tracker:
        """The store in `cfg` (tracking group), checked to be reachable and to accept the login;
        inside a sweep (its parent run open) a server that does not answer, which answered when
        the sweep began, is waited for `cfg.wait_s` seconds."""
        _probe(cfg.uri, cfg.get("wait_s", 0) if PARENT_ENV in os.environ else 0)
        tracker = cls(cfg.uri, cfg.get("artifact_root"), cfg.get("ui_url"))
        try:
            tracker.client.search_experiments(max_results=1)
        except TrackingError:
            raise
        except Exception as error:
            raise TrackingError(
                f"MLflow store {cfg.uri} cannot be used ({_one_line(error)}); "
                "fix MLFLOW_TRACKING_URI or unset it"
            ) from error
        tracker.close_unclosed()
        return tracker

    def check_writable(self, *experiments: str) -> None:
        """Fail before any work when the login may not write to one of `experiments` (on a server
        with logins; an experiment not there yet is created by, and belongs to, this user)."""
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        if urlparse(self.uri).scheme not in ("http", "https") or not user:
            return
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        for name in experiments:
            self.experiment = name
            found = self.client.get_experiment_by_name(name)
            if found is None:
                continue
            answer = http_request(
                get_default_host_creds(self.uri),
                "/api/3.0/mlflow/users/permissions/get",
                "GET",
                params={"username": user, "resource_type": "experiment", "resource_id": found.experiment_id},
            )
            if answer.status_code != 200:
                continue  # a server without logins answers 404: anyone may write
            if answer.json().get("permission") not in ("EDIT", "MANAGE"):
                denied = explain(_Denied(), self.uri, name)
                assert denied is not None
                raise denied

    def close_unclosed(self) -> None:
        """End FAILED, with their error, this process's runs that ended while the server was away."""
        while _unclosed:
            run_id, error = _unclosed[0]
            self.end_run(run_id, "FAILED", error)
            _unclosed.pop(0)

    def experiment_id(self, name: str) -> str:
        self.experiment = name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except TrackingError:
            raise
        except Exception:  # created meanwhile by a parallel job
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def start_run(
        self,
        experiment: str,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_id: str | None = None,
    ) -> str:
        all_tags = {**provenance_tags(), **(tags or {}), MLFLOW_RUN_NAME: name}  # a new dict
        if parent_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_id
        run_id = self.client.create_run(self.experiment_id(experiment), run_name=name).info.run_id
        try:
            self.log_params(run_id, params or {})
            self.set_tags(run_id, all_tags)
        except BaseException as error:
            self.end_run(run_id, "FAILED", error)
            raise
        return run_id

    def end_run(
        self, run_id: str, status: str = "FINISHED", error: BaseException | str | None = None
    ) -> None:
        """Close a run; `error` (an exception or a sentence) becomes its `error` tag."""
        if error is None:
            self.client.set_terminated(run_id, status)
            return
        try:  # the store itself may be what failed; do what can still be done
            self.client.set_tag(run_id, "error", _one_line(error))
        finally:
            self.client.set_terminated(run_id, status)

    @contextmanager
    def run(
        self,
        experiment: str,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_id: str | None = None,
    ) -> Iterator[str]:
        """A run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C, SIGTERM), never RUNNING."""
        run_id = self.start_run(experiment, name, params, tags, parent_id)
        try:
            yield run_id
        except (KeyboardInterrupt, Stopped) as error:
            self.end_run(run_id, "KILLED", error)
            raise
        except BaseException as error:
            explained = explain(error, self.uri, experiment) if isinstance(error, Exception) else None
            if explained is not None and explained.gone:
                # the run cannot be closed while the server is away: the next connection does it
                _unclosed.append((run_id, str(explained)))
                if explained is error:
                    raise
                raise explained from error
            self.end_run(run_id, "FAILED", error)
            if explained is not None and explained is not error:
                raise explained from error
            raise
        self.end_run(run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i : i + _BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        items = [RunTag(key, str(value)) for key, value in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, tags=items[i : i + _BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()]
        )

    def log_figure(
        self, run_id: str, figure, artifact_file: str, image_key: str | None = None, step: int = 0
    ) -> None:
        """A figure as a PNG artifact; with `image_key` also as an image at `step`, which the UI's
        image chart puts beside the other runs' images."""
        self.client.log_figure(run_id, figure, artifact_file)
        if image_key is not None:
            figure.canvas.draw()
            pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3]  # (H, W, 3) uint8
            self.client.log_image(run_id, pixels, key=image_key, step=step)
        plt.close(figure)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def log_table(self, run_id: str, table: Mapping[str, list], artifact_file: str) -> None:
        """Columns of equal length, shown as a table in the MLflow UI."""
        with warnings.catch_warnings():  # MLflow's own use of pandas raises a deprecation warning
            warnings.filterwarnings("ignore", message=".*'str' dtypes are included by select_dtypes")
            self.client.log_table(run_id, dict(table), artifact_file)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def find_runs(self, experiment: str, **tags: str) -> list:
        """Runs of `experiment` carrying all of `tags`, newest first."""
        if self.client.get_experiment_by_name(experiment) is None:
            return []
        where = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        return self.client.search_runs(
            [self.experiment_id(experiment)],
            filter_string=where,
            max_results=10_000,
            order_by=["attributes.start_time DESC"],
        )

    def children(self, experiment: str, parent_id: str) -> list:
        return self.find_runs(experiment, **{MLFLOW_PARENT_RUN_ID: parent_id})

    def metrics(self, run_id: str) -> dict[str, float]:
        """A run's latest value of every metric."""
        return dict(self.client.get_run(run_id).data.metrics)

    def lightning_logger(self, experiment: str, run_id: str):
        """A Lightning logger that writes a Trainer's metrics into the open run `run_id`."""
        from pytorch_lightning.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=experiment, tracking_uri=self.uri, run_id=run_id)

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI."""
        return ui.run_url(self.ui, self.client.get_run(run_id).info.experiment_id, run_id)

    def save_view(self, experiment: str, view_id: str, name: str, state: dict) -> str:
        """Create, or update in place, a saved view of `experiment`'s runs page (listed by `name`
        in the UI's Views menu); return the link that opens it. Sweep views beyond the newest
        `ui.KEEP_SWEEP_VIEWS` are deleted."""
        experiment_id = self.experiment_id(experiment)
        tags = dict(self.client.get_experiment(experiment_id).tags)
        key = ui.VIEW_TAG + view_id
        tags[key] = ui.envelope(name, state, ui.created_at(tags.get(key)))
        self.client.set_experiment_tag(experiment_id, key, tags[key])
        for stale in ui.stale_sweep_views(tags):
            self.client.delete_experiment_tag(experiment_id, stale)
        return ui.view_url(self.ui, experiment_id, view_id)

    def reopen(self, run_id: str) -> None:
        """Mark a finished run RUNNING again (a resumed sweep's parent)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """`text` as the run's artifact `artifact_file` (e.g. a markdown table)."""
        self.client.log_text(run_id, text, artifact_file)

    def all_runs(self) -> list:
        """Every run of every experiment in the store (creating an empty store if there is none)."""
        ids = [e.experiment_id for e in self.client.search_experiments()]
        return self.client.search_runs(ids, max_results=10_000) if ids else []
