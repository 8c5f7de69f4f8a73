"""What the MLflow UI shows: links to experiments and runs, and saved comparison views.

A saved view is an experiment tag `mlflow.sharedViewState.<id>` holding the runs page's state
(filter, sort, columns, chart cards). The UI lists it by name in its "Views" menu and opens it
from a link. The state is MLflow 3's own UI format, not a public API: the browser test
(tests/test_ui_browser.py) opens every kind of view this module writes in Chromium.
"""

from __future__ import annotations

import base64
import json
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlparse

LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` serves the local store
VIEW_TAG = "mlflow.sharedViewState."
SWEEP_VIEW = "sweep-"  # id prefix of the views sweeps write (the rest is the parent run id)
KEEP_SWEEP_VIEWS = 30  # newest sweep views kept per experiment: the UI's "save view" stops at 40
MODE = "workflowType=machine_learning"  # the runs table ("Model training"), not the GenAI overview

SWEEP_CHARTS = ("success_rate", "adv_accuracy", "l2_mean")  # drawn against the swept value
SWEEP_COLUMNS = (
    "success_rate",
    "adv_accuracy",
    "clean_accuracy",
    "l2_mean",
    "linf_max",
    "min_l2_mean",
    "images_per_second",
)  # shown when the runs have them
TRAIN_CHARTS = ("val_accuracy", "val_loss", "train_loss")  # against the training step
TRAIN_COLUMNS = ("test_accuracy", "val_accuracy", "train_seconds")
IMAGE_KEY = "examples"  # log_image key of each attack run's example grid
# one colour per series (the values of the other swept keys), Tableau 10
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def base_url(tracking_uri: str, configured: str | None = None) -> str:
    """The UI's address: `configured` (tracking.ui_url), else the tracking server itself, else
    what `make ui` serves."""
    if configured:
        return configured.rstrip("/")
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return LOCAL_UI


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?{MODE}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODE}"


def view_url(base: str, experiment_id: str, view_id: str) -> str:
    """Opens a saved view as charts. (A search facet in the link would make the UI ignore the
    view, so there is none.)"""
    return (
        f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={view_id}&compareRunsMode=CHART&{MODE}"
    )


def encode_state(state: dict) -> str:
    """The UI's encoding of a view state: "deflate;" + base64 of zlib-compressed JSON."""
    return "deflate;" + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()


def decode_state(text: str) -> dict:
    if text.startswith("deflate;"):
        text = zlib.decompress(base64.b64decode(text.removeprefix("deflate;"))).decode()
    return json.loads(text)


def column(kind: str, key: str) -> str:
    """A runs-table column (and sort key) as the UI names it: metrics.`success_rate`."""
    return f"{kind}.`{key}`"


def _card(uuid: str, section: str, kind: str, **fields: Any) -> dict:
    return {
        "uuid": uuid,
        "type": kind,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "runsCountToCompare": 100,
        **fields,
    }


def scatter(uuid: str, section: str, x: tuple[str, str], y: str) -> dict:
    """y (a metric) against x = (key, "METRIC" or "PARAM"), one point per run."""
    return _card(
        uuid, section, "SCATTER", xaxis={"key": x[0], "type": x[1]}, yaxis={"key": y, "type": "METRIC"}
    )


def line(uuid: str, section: str, metric: str) -> dict:
    """A metric's history against the step, one line per run."""
    return _card(
        uuid,
        section,
        "LINE",
        metricKey=metric,
        selectedMetricKeys=[metric],
        xAxisKey="step",
        scaleType="linear",
        lineSmoothness=0,
        useGlobalXaxisKey=False,
        useGlobalLineSmoothing=False,
        runsCountToCompare=10,
    )


def images(uuid: str, section: str, key: str, step: int = 0) -> dict:
    """The runs' `log_image` images of `key` side by side (the UI shows the first 10 runs)."""
    return _card(
        uuid, section, "IMAGE", imageKeys=[key], step=step, showRunParams=False, runsCountToCompare=10
    )


def hidden(metric: str) -> dict:
    """A deleted placeholder: without one per metric the UI adds a chart of its own for every
    metric the runs have."""
    card = _card(f"hidden-{metric}", "", "BAR", metricKey=metric)
    return card | {"deleted": True, "isGenerated": True}


def view_state(
    search: str,
    order_by: str,
    ascending: bool,
    columns: Iterable[str],
    sections: Sequence[tuple[str, str]],
    cards: list[dict],
    metrics: Iterable[str] = (),
) -> dict:
    """A runs page showing the runs `search` selects, sorted, with `columns` in the table and
    only `cards` (in `sections`: (uuid, name) pairs, in order) as charts."""
    shown = {card.get("metricKey") for card in cards}
    return {
        "searchFilter": search,
        "orderByKey": order_by,
        "orderByAsc": ascending,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": list(columns),
        "runsHiddenMode": "SHOW_ALL",
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "compareRunSections": [
            {"uuid": uuid, "name": name, "display": True, "isReordered": False} for uuid, name in sections
        ],
        "compareRunCharts": cards + [hidden(m) for m in sorted(set(metrics) - shown)],
    }


def sweep_view(
    parent_id: str, x: tuple[str, str] | None, params: Sequence[str], metrics: Iterable[str]
) -> dict:
    """A sweep's children, sorted by the swept value x = (key, "METRIC" or "PARAM"; None: nothing
    swept, oldest first): the swept params and key metrics as columns, the key metrics against x,
    the example grids side by side."""
    metrics = set(metrics)
    columns = [column("params", p) for p in params]
    columns += [column("metrics", m) for m in SWEEP_COLUMNS if m in metrics]
    charts = [scatter(f"sweep-{m}", "sweep", x, m) for m in SWEEP_CHARTS if m in metrics] if x else []
    order = column("metrics" if x[1] == "METRIC" else "params", x[0]) if x else "attributes.start_time"
    return view_state(
        f"tags.mlflow.parentRunId = '{parent_id}'",
        order,
        True,
        columns,
        [("sweep", "against " + x[0] if x else "sweep"), ("examples", "examples")],
        charts + [images("examples", "examples", IMAGE_KEY)],
        metrics,
    )


def training_view(metrics: Iterable[str]) -> dict:
    """Every training run of the experiment (each cached model), newest first: the loss and
    accuracy curves side by side."""
    columns = [column("params", "model.name")] + [column("metrics", m) for m in TRAIN_COLUMNS]
    charts = [line(f"train-{m}", "training", m) for m in TRAIN_CHARTS]
    return view_state(
        "tags.stage = 'train'",
        "attributes.start_time",
        False,
        columns,
        [("training", "training curves")],
        charts,
        metrics,
    )


def envelope(name: str, state: dict, created: int | None = None) -> str:
    """A saved view's tag value; `created` (ms) is kept when a view is updated."""
    now = int(time.time() * 1000)
    return json.dumps(
        {"name": name, "createdAt": created or now, "updatedAt": now, "state": encode_state(state)}
    )


def created_at(tag_value: str | None) -> int | None:
    try:
        return int(json.loads(tag_value or "")["createdAt"])
    except (ValueError, KeyError, TypeError):
        return None


def stale_sweep_views(tags: dict[str, str], keep: int = KEEP_SWEEP_VIEWS) -> list[str]:
    """Tag keys of the sweep views beyond the newest `keep` (the user's own views are left)."""
    views = sorted(
        (created_at(value) or 0, key) for key, value in tags.items() if key.startswith(VIEW_TAG + SWEEP_VIEW)
    )
    return [key for _, key in views[: max(len(views) - keep, 0)]]


def series_colours(labels: Iterable[str]) -> dict[str, str]:
    """One colour per series label, in order of first appearance."""
    colours: dict[str, str] = {}
    for label in labels:
        colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
    return colours


def links(tracker, base: str) -> list[str]:
    """Lines naming each experiment's runs table and the newest sweep's comparison, at `base`."""
    experiments = tracker.client.search_experiments()
    lines = [
        f"  {e.name:<24} {experiment_url(base, e.experiment_id)}" for e in experiments if e.name != "Default"
    ]
    sweeps = (
        tracker.client.search_runs(
            [e.experiment_id for e in experiments],
            "tags.stage = 'sweep'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if experiments
        else []
    )
    if sweeps and "sweep.view_url" in sweeps[0].data.tags:
        info = sweeps[0].info
        lines.append(
            f"newest sweep ({info.run_name}):\n  "
            f"{view_url(base, info.experiment_id, SWEEP_VIEW + info.run_id)}"
        )
    return lines or ["  (no experiments yet: run `make demo` or `python -m pipeline ... -m`)"]


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.tracking.ui` (`make ui`): print where each experiment's runs table is, then serve
    the local store with `mlflow ui`."""
    import argparse
    import os
    import shutil
    import sys
    from pathlib import Path

    from pipeline.config import PROJECT_ROOT
    from pipeline.tracking.store import Tracker

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking.ui", description=main.__doc__)
    parser.add_argument(
        "--store",
        default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT_ROOT / 'outputs' / 'mlflow.db'}"),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--links", action="store_true", help="print the links only; serve nothing")
    args = parser.parse_args(argv)
    served = urlparse(args.store).scheme in ("http", "https")
    base = base_url(args.store) if served else f"http://{args.host}:{args.port}"
    if args.store.startswith("sqlite:///"):
        Path(args.store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI on {base} over {args.store}\nexperiments (runs table, 'Model training' mode):")
    print("\n".join(links(Tracker(args.store), base)), flush=True)
    if args.links or served:
        return
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [
        mlflow,
        "ui",
        "--backend-store-uri",
        args.store,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
