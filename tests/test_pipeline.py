"""The whole job in-process: what reaches MLflow, caching, reproducibility, eps lists, failures."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import PROJECT_ROOT
from pipeline.data.mnist import MNISTData
from pipeline.metrics import EXTRA_KEYS, METRIC_KEYS
from pipeline.run import run
from pipeline.tracking.store import Tracker
from tests.conftest import all_runs, make_config, small_overrides

TIMING = {"attack_seconds", "images_per_second"}


def _runs(store, experiment):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _numbers(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


def test_attack_run_records_the_contract(mnist_root, store, tmp_path):
    cfg = make_config(small_overrides(tmp_path))
    metrics = run(cfg)
    assert set(metrics) == set(METRIC_KEYS) | set(EXTRA_KEYS)
    assert metrics["forward_passes_per_image"] == 1 and metrics["backward_passes_per_image"] == 1
    (attack_run,) = _runs(store, "mnist")
    assert attack_run.info.status == "FINISHED"
    timing = {"seconds_setup", "seconds_attack_step", "seconds_tracking", "rss_mb", "peak_rss_mb"}
    assert set(attack_run.data.metrics) == set(METRIC_KEYS) | set(EXTRA_KEYS) | timing
    assert all(attack_run.data.metrics[key] > 0 for key in timing)
    assert attack_run.data.metrics["eps"] == 0.1
    params, tags = attack_run.data.params, attack_run.data.tags
    assert params["attack.name"] == "fgsm" and params["model.name"] == "cnn"
    assert params["eps"] == "0.1" and params["seed"] == "0" and params["n_eval"] == "200"
    checkpoint = tags["checkpoint"]
    assert checkpoint.startswith(str(tmp_path)) and checkpoint.endswith(".ckpt")
    assert tags["checkpoint_hash"] in checkpoint
    assert len(tags["git_commit"]) in (40, len("unknown"))
    for key in (
        "version.torch",
        "version.pytorch-lightning",
        "version.mlflow",
        "data_sha256.t10k-images-idx3-ubyte",
        "model.test_accuracy",
        "model.train_run_id",
    ):
        assert tags[key], key

    client = MlflowClient(store)
    artifacts = {a.path for a in client.list_artifacts(attack_run.info.run_id)}
    assert {"config.yaml", "overrides.yaml", "eval_indices.json", "examples_eps0.1.png"} <= artifacts
    indices = json.loads(
        open(client.download_artifacts(attack_run.info.run_id, "eval_indices.json", str(tmp_path))).read()
    )
    assert indices == MNISTData(str(mnist_root)).eval_subset(200, seed=0)[0]

    (train_run,) = _runs(store, "mnist-train")
    assert train_run.info.run_id == tags["model.train_run_id"]
    assert train_run.info.status == "FINISHED"
    assert 0.5 < train_run.data.metrics["test_accuracy"] <= 1  # well above chance
    assert {"train_loss", "val_accuracy", "train_seconds"} <= set(train_run.data.metrics)
    assert [a.path for a in client.list_artifacts(train_run.info.run_id, "checkpoint")]


def test_checkpoint_is_cached_and_force_retrains_to_the_same_weights(mnist_root, store, tmp_path):
    from pipeline import load_classifier

    cfg = make_config(small_overrides(tmp_path))
    run(cfg)
    first = load_classifier(_runs(store, "mnist")[0].data.tags["checkpoint"]).state_dict()
    run(cfg)
    assert len(_runs(store, "mnist-train")) == 1  # the second job reused the checkpoint
    run(make_config(small_overrides(tmp_path, "train.force=true")))
    assert len(_runs(store, "mnist-train")) == 2
    again = load_classifier(_runs(store, "mnist")[0].data.tags["checkpoint"]).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_same_config_gives_identical_metrics(mnist_root, store, tmp_path):
    cfg = make_config(small_overrides(tmp_path, "attack.targeted=true", "attack.target=random"))
    assert _numbers(run(cfg)) == _numbers(run(cfg))


def test_splitting_batches_over_cpu_workers_changes_no_number(mnist_root, store, tmp_path):
    split, whole = (
        run(make_config(small_overrides(tmp_path, f"cpu_workers={n}", "eps=0.2"))) for n in (2, 1)
    )
    assert _numbers(split) == _numbers(whole)
    workers_used = sorted(r.data.tags["cpu_workers_used"] for r in _runs(store, "mnist"))
    assert workers_used == ["1", "2"]


def test_the_fast_cpu_model_finds_what_the_model_as_given_finds(mnist_root, store, tmp_path):
    """fast_cpu_model (pipeline.models.fast) computes the same function up to float rounding:
    the same images fooled, norms to rounding."""
    fast, given = (
        run(make_config(small_overrides(tmp_path, f"fast_cpu_model={on}", "attack=pgd", "attack.steps=5")))
        for on in ("true", "false")
    )
    assert fast["success_rate"] > 0
    assert _numbers(fast) == pytest.approx(_numbers(given), rel=1e-5, abs=1e-6)
    for key in ("success_rate", "clean_accuracy", "adv_accuracy"):
        assert fast[key] == given[key], key


def test_eps_list_evaluates_every_eps_from_one_gradient(mnist_root, store, tmp_path):
    separate = {
        eps: _numbers(run(make_config(small_overrides(tmp_path, f"eps={eps}")))) for eps in (0.05, 0.2)
    }
    run(make_config(small_overrides(tmp_path, "attack.eps_list=[0.05,0.2]")))
    client = MlflowClient(store)
    listed = next(r for r in _runs(store, "mnist") if r.data.params["attack.eps_list"] != "None")
    for key in separate[0.05]:
        history = sorted(client.get_metric_history(listed.info.run_id, key), key=lambda m: m.step)
        assert [m.value for m in history] == pytest.approx(
            [separate[0.05][key], separate[0.2][key]], rel=1e-6
        ), key
    artifacts = {a.path for a in client.list_artifacts(listed.info.run_id)}
    assert {"examples_eps0.05.png", "examples_eps0.2.png", "eps_curve.png"} <= artifacts


def test_targeted_success_is_a_subset_of_misclassification(mnist_root, store, tmp_path):
    for target in ("least_likely", 3):
        m = run(
            make_config(
                small_overrides(tmp_path, "attack.targeted=true", f"attack.target={target}", "eps=0.3")
            )
        )
        assert 0 < m["success_rate"] <= 1
        fooled_fraction = m["success_rate"] * m["clean_accuracy"]
        assert fooled_fraction <= 1 - m["adv_accuracy"] + 1e-9


def exploding_attack(model, x, y, eps, **kwargs):
    raise RuntimeError("attack blew up")


def test_failure_inside_a_job_marks_the_run_failed(mnist_root, store, tmp_path):
    cfg = make_config(small_overrides(tmp_path, "attack.function=tests.test_pipeline.exploding_attack"))
    with pytest.raises(RuntimeError, match="blew up"):
        run(cfg)
    (failed,) = _runs(store, "mnist")
    assert failed.info.status == "FAILED"
    assert "attack blew up" in failed.data.tags["error"]


def test_tracker_run_end_states(store):
    tracker = Tracker(store)
    with tracker.run("states", "ok") as ok_id:
        pass
    with pytest.raises(ValueError), tracker.run("states", "bad"):
        raise ValueError("broken input")
    with pytest.raises(KeyboardInterrupt), tracker.run("states", "interrupted"):
        raise KeyboardInterrupt
    status = {r.info.run_name: (r.info.status, r.data.tags.get("error")) for r in all_runs(store)}
    assert status["ok"] == ("FINISHED", None)
    assert status["bad"] == ("FAILED", "ValueError: broken input")
    assert status["interrupted"][0] == "KILLED"
    assert MlflowClient(store).get_run(ok_id).data.tags["git_commit"]


def test_local_store_keeps_artifacts_under_outputs(store, tmp_path):
    tracker = Tracker(store, str(tmp_path / "mlartifacts"))
    experiment = MlflowClient(store).get_experiment(tracker.experiment_id("where"))
    assert experiment.artifact_location == (tmp_path / "mlartifacts" / "where").as_uri()
    assert PROJECT_ROOT.joinpath("conf").is_dir()


def test_minimal_perturbation_attack_logs_its_norms_and_the_curve_they_imply(mnist_root, store, tmp_path):
    cfg = make_config(small_overrides(tmp_path, "attack=deepfool"))
    metrics = run(cfg)
    assert metrics["success_rate"] == 1.0 and 0 < metrics["min_l2_median"] < 5
    assert "eps" not in metrics
    (attack_run,) = _runs(store, "mnist")
    client = MlflowClient(store)
    run_id = attack_run.info.run_id
    assert {"min_norm.png", "robustness_curve.json", "per_image.json"} <= {
        a.path for a in client.list_artifacts(run_id)
    }
    curve = json.loads(open(client.download_artifacts(run_id, "robustness_curve.json", str(tmp_path))).read())
    table = dict(zip(curve["columns"], zip(*curve["data"], strict=True), strict=True))
    accuracy = list(table["accuracy"])
    assert accuracy[0] == pytest.approx(metrics["clean_accuracy"])  # budget 0: nothing is fooled
    assert accuracy[-1] == pytest.approx(metrics["adv_accuracy"])  # the largest norm: all are
    assert accuracy == sorted(accuracy, reverse=True)
