"""The MLflow UI's links and saved views, read back from a real store (no browser: what the UI
makes of them is tests/test_ui_browser.py)."""

import base64
import json
import zlib

from pipeline.tracking import ui
from pipeline.tracking.store import Tracker
from pipeline.tracking.sweep import Sweep


def _views(tracker: Tracker, experiment: str) -> dict[str, dict]:
    experiment_id = tracker.experiment_id(experiment)
    tags = tracker.client.get_experiment(experiment_id).tags
    return {
        key.removeprefix(ui.VIEW_TAG): json.loads(value)
        for key, value in tags.items()
        if key.startswith(ui.VIEW_TAG)
    }


def _sweep(tracker, overrides, points, resume=False):
    """A finished sweep whose children have the given params and metrics, as its jobs leave them."""
    sweep = Sweep(tracker, "exp", overrides, resume=resume)
    for number, (params, metrics) in enumerate(points):
        with tracker.run("exp", f"job {number}", params, {"stage": "attack"}, sweep.run_id) as run_id:
            tracker.log_metrics(run_id, metrics)
    sweep.finish()
    return sweep


def test_state_is_deflated_json_as_the_ui_reads_it():
    state = {"searchFilter": "tags.stage = 'train'", "compareRunCharts": [{"uuid": "a"}]}
    text = ui.encode_state(state)
    assert text.startswith("deflate;")
    assert json.loads(zlib.decompress(base64.b64decode(text[len("deflate;") :]))) == state
    assert ui.decode_state(text) == state == ui.decode_state(json.dumps(state))


def test_links_open_the_model_training_mode():
    assert ui.base_url("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
    assert ui.base_url("http://host:5000/") == "http://host:5000"
    assert ui.base_url("sqlite:////x/mlflow.db", "http://gpu-box:8080/") == "http://gpu-box:8080"
    assert ui.experiment_url("http://h", "3") == "http://h/#/experiments/3/runs?workflowType=machine_learning"
    assert ui.run_url("http://h", "3", "abc") == (
        "http://h/#/experiments/3/runs/abc?workflowType=machine_learning"
    )
    # no search facet in a view's link: the UI would ignore the view
    assert ui.view_url("http://h", "3", "v") == (
        "http://h/#/experiments/3/runs?viewStateShareKey=v"
        "&compareRunsMode=CHART&workflowType=machine_learning"
    )


def test_an_eps_sweep_view_sorts_its_children_and_plots_metrics_against_eps(tmp_path, capsys):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    points = [
        (
            {"eps": eps, "attack.name": "fgsm"},
            {
                "eps": eps,
                "success_rate": eps * 3,
                "adv_accuracy": 1 - eps,
                "l2_mean": eps * 20,
                "clean_accuracy": 0.99,
                "images_per_second": 1000.0,
            },
        )
        for eps in (0.2, 0.05, 0.1)
    ]
    sweep = _sweep(tracker, ["attack=fgsm", "eps=0.2,0.05,0.1"], points)
    ((view_id, view),) = _views(tracker, "exp").items()
    assert view_id == "sweep-" + sweep.run_id
    assert view["name"] == "sweep attack=fgsm eps=0.2,0.05,0.1"
    state = ui.decode_state(view["state"])
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{sweep.run_id}'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`eps`", True)
    assert state["selectedColumns"][:3] == [
        "params.`eps`",
        "metrics.`success_rate`",
        "metrics.`adv_accuracy`",
    ]
    shown = [c for c in state["compareRunCharts"] if not c["deleted"]]
    assert [(c["type"], c.get("xaxis"), c.get("yaxis", {}).get("key")) for c in shown] == [
        ("SCATTER", {"key": "eps", "type": "METRIC"}, "success_rate"),
        ("SCATTER", {"key": "eps", "type": "METRIC"}, "adv_accuracy"),
        ("SCATTER", {"key": "eps", "type": "METRIC"}, "l2_mean"),
        ("IMAGE", None, None),
    ]
    assert shown[-1]["imageKeys"] == [ui.IMAGE_KEY]
    # every metric without a chart of its own (scatter axes do not count) has a deleted
    # placeholder, so the UI adds no charts of its own
    hidden = {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]}
    assert hidden == set(points[0][1])
    assert {s["uuid"] for s in state["compareRunSections"]} == {c["metricSectionId"] for c in shown}
    assert len(json.dumps(view)) < 20_000  # the UI's limit for a saved view
    printed = capsys.readouterr().out
    assert f"compare the sweep in the MLflow UI (start it with `make ui`): {sweep.view_url}" in printed
    assert sweep.view_url == ui.view_url(ui.LOCAL_UI, tracker.experiment_id("exp"), view_id)
    assert tracker.client.get_run(sweep.run_id).data.tags["sweep.view_url"] == sweep.view_url


def test_a_resumed_sweep_updates_its_view(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    point = ({"eps": 0.1}, {"eps": 0.1, "success_rate": 0.3})
    first = _sweep(tracker, ["eps=0.1,0.2"], [point])
    before = _views(tracker, "exp")["sweep-" + first.run_id]
    again = _sweep(tracker, ["eps=0.1,0.2"], [({"eps": 0.2}, {"eps": 0.2, "success_rate": 0.6})], resume=True)
    assert again.run_id == first.run_id
    (after,) = _views(tracker, "exp").values()
    assert after["createdAt"] == before["createdAt"] and after["updatedAt"] >= before["updatedAt"]


def test_two_swept_keys_colour_each_series_and_a_numeric_key_becomes_a_metric(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    points = [
        ({"attack.name": attack, "attack.reg": reg}, {"success_rate": reg})
        for attack in ("fgsm", "pgd")
        for reg in ("0.5", "2")
    ]
    sweep = _sweep(tracker, ["attack=fgsm,pgd", "attack.reg=0.5,2"], points)
    runs = tracker.children("exp", sweep.run_id)
    colours = {}
    for run in runs:
        assert run.data.metrics["attack.reg"] == float(run.data.params["attack.reg"])  # sortable
        colours.setdefault(run.data.params["attack.name"], set()).add(run.data.tags["mlflow.runColor"])
    assert all(len(c) == 1 for c in colours.values()) and colours["fgsm"] != colours["pgd"]
    state = ui.decode_state(_views(tracker, "exp")["sweep-" + sweep.run_id]["state"])
    assert state["orderByKey"] == "metrics.`attack.reg`"
    assert {"params.`attack.name`", "params.`attack.reg`"} <= set(state["selectedColumns"])


def test_a_categorical_sweep_is_drawn_against_the_param(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"))
    points = [({"model.name": m}, {"success_rate": s}) for m, s in (("mlp", 0.5), ("cnn", 0.2))]
    sweep = _sweep(tracker, ["model=mlp,cnn"], points)
    state = ui.decode_state(_views(tracker, "exp")["sweep-" + sweep.run_id]["state"])
    assert state["orderByKey"] == "params.`model.name`"
    assert state["compareRunCharts"][0]["xaxis"] == {"key": "model.name", "type": "PARAM"}
    assert all("mlflow.runColor" not in r.data.tags for r in tracker.children("exp", sweep.run_id))


def test_old_sweep_views_make_room_and_the_users_own_views_stay():
    tags = {
        f"{ui.VIEW_TAG}sweep-{n}": json.dumps({"name": str(n), "createdAt": n, "state": "{}"})
        for n in range(1, 34)
    }
    tags[f"{ui.VIEW_TAG}1770000000000abc"] = json.dumps({"name": "mine", "createdAt": 0, "state": "{}"})
    assert ui.stale_sweep_views(tags) == [f"{ui.VIEW_TAG}sweep-{n}" for n in (1, 2, 3)]


def test_the_training_view_draws_every_cached_models_curves():
    state = ui.training_view({"val_accuracy", "train_loss", "val_loss", "epoch", "test_accuracy"})
    assert state["searchFilter"] == "tags.stage = 'train'"
    shown = [c for c in state["compareRunCharts"] if not c["deleted"]]
    assert [(c["type"], c["metricKey"], c["xAxisKey"]) for c in shown] == [
        ("LINE", "val_accuracy", "step"),
        ("LINE", "val_loss", "step"),
        ("LINE", "train_loss", "step"),
    ]
    assert {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]} == {"epoch", "test_accuracy"}
