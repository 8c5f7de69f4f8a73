"""The command line as users type it: the sweep end to end, reruns, and every bad input."""

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from pipeline.cli import entrypoint
from pipeline.metrics import METRIC_KEYS
from pipeline.tracking import ui
from pipeline.train import main as train_main
from tests.conftest import PROJECT_ROOT, SMALL, all_runs, free_port, small_overrides

SWEEP = ["attack=fgsm", "eps=0.05,0.1,0.2"]  # as in README: python -m pipeline attack=fgsm eps=... -m


def cli(args, store, timeout=600):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_children(store, experiment=None):
    runs = all_runs(store, experiment)
    parents = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    return parents, {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for p in parents
    }


@pytest.mark.slow
def test_sweep_as_typed_then_rerun_gives_identical_metrics(mnist_root, store, tmp_path):
    first = cli([*SWEEP, *small_overrides(tmp_path), "-m"], store)
    assert first.returncode == 0, first.stderr[-3000:]
    parents, children = sweep_children(store)
    (parent,) = parents
    kids = children[parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(kids) == 3
    client = MlflowClient(store)
    assert {"summary_success_accuracy.png", "summary_l2.png", "sweep_summary.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    assert parent.data.metrics["jobs"] == 3 and parent.data.metrics["jobs_failed"] == 0
    by_eps = {}
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert set(METRIC_KEYS) <= set(kid.data.metrics)
        eps = kid.data.metrics["eps"]
        assert kid.data.params["eps"] == f"{eps:g}"
        assert f"examples_eps{eps:g}.png" in {a.path for a in client.list_artifacts(kid.info.run_id)}
        assert any(
            a.path.startswith(f"images/{ui.IMAGE_KEY}+step+0+") and a.path.endswith(".png")
            for a in client.list_artifacts(kid.info.run_id, "images")
        )  # for the UI's image chart
        by_eps[eps] = kid.data.metrics
    assert sorted(by_eps) == [0.05, 0.1, 0.2]
    rates = [by_eps[eps]["success_rate"] for eps in sorted(by_eps)]
    assert rates == sorted(rates) and rates[-1] > rates[0]
    assert len([r for r in all_runs(store) if r.data.tags.get("stage") == "train"]) == 1

    second = cli([*SWEEP, *small_overrides(tmp_path), "resume=false", "-m"], store)  # a fresh process
    assert second.returncode == 0, second.stderr[-3000:]
    parents, children = sweep_children(store)
    (rerun,) = [p for p in parents if p.info.run_id != parent.info.run_id]
    again = {k.data.metrics["eps"]: k.data.metrics for k in children[rerun.info.run_id]}
    for eps, metrics in by_eps.items():
        for key in set(METRIC_KEYS) - {"attack_seconds", "images_per_second"}:
            assert again[eps][key] == metrics[key], (eps, key)
    assert len([r for r in all_runs(store) if r.data.tags.get("stage") == "train"]) == 1


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["eps=2"]])
def test_help_and_config_errors_answer_before_torch_lightning_and_mlflow(args):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"hydra", "omegaconf"} <= imported
    assert not {"torch", "pytorch_lightning", "mlflow", "matplotlib"} & imported
    if args == ["eps=2"]:
        assert done.returncode == 2 and "error: eps=2 is out of range" in done.stderr
    else:
        assert done.returncode == 0 and ("Config groups" in done.stdout or "attack:" in done.stdout)


def test_bad_input_in_a_real_process(store, tmp_path):
    result = cli(["attack=nope", f"paths.outputs={tmp_path}"], store)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown attack 'nope'; valid options: apgd, apgd_t, autoattack, bim, cw_l2, deepfool, "
        "fab, fgsm, lbfgs, mifgsm, pgd, pgd_l2, square, szegedy_sgd (e.g. attack=apgd)"
    ]
    assert all_runs(store) == []


def _argv(args, outputs):
    return [
        "pipeline",
        *([] if outputs is None else [f"paths.outputs={outputs}"]),
        "trainer.enable_progress_bar=false",
        *args,
    ]


def invoke(task, args, outputs):
    """Run the CLI in this process (saves a 15 s interpreter start-up per case); the exit status."""
    sys.argv = _argv(args, outputs)
    try:
        with pytest.raises(SystemExit) as exit_info:
            entrypoint(task)
    finally:
        for handler in logging.getLogger().handlers:  # Hydra's job log file, left open by a failed job
            handler.close()
    return exit_info.value.code


def invoke_ok(task, args, outputs):
    """As `invoke`, for a run that must succeed."""
    sys.argv = _argv(args, outputs)
    entrypoint(task)


def test_unreachable_tracking_server_in_a_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Hydra "callback raised" warning, no jobs started
        assert invoke(main, ["eps=0.1,0.2", "-m"], tmp_path) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is unreachable" in line


def test_a_failing_job_fails_the_sweep_but_not_the_others(mnist_root, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    args = [*SMALL, "checkpoint=/no/such/model.ckpt,null", "-m"]  # only found missing inside the job
    assert invoke(main, args, tmp_path) == 2
    assert "checkpoint /no/such/model.ckpt does not exist" in capsys.readouterr().err
    parents, children = sweep_children(store)
    (parent,) = parents
    assert parent.info.status == "FAILED" and "does not exist" in parent.data.tags["error"]
    assert parent.data.metrics["jobs"] == 2 and parent.data.metrics["jobs_failed"] == 1
    (child,) = children[parent.info.run_id]
    assert child.info.status == "FINISHED" and child.data.params["checkpoint"] == "None"
    assert not [r for r in all_runs(store) if r.info.status == "RUNNING"]


def test_fail_fast_stops_the_sweep_at_the_first_failed_job(mnist_root, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    args = [*SMALL, "checkpoint=/no/such/model.ckpt,null", "fail_fast=true", "-m"]
    assert invoke(main, args, tmp_path) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: checkpoint /no/such/model.ckpt does not exist")
    assert line.endswith("(fail_fast=true: the remaining jobs were not started)")
    (parent,) = all_runs(store)  # the second job never started: nothing was trained or attacked
    assert parent.info.status == "FAILED" and parent.data.metrics["jobs_failed"] == 1


def test_train_entry_point(mnist_root, store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pipeline.train", *small_overrides(tmp_path)])
    entrypoint(train_main)
    assert "test accuracy" in capsys.readouterr().out
    (trained,) = all_runs(store)
    assert trained.data.tags["stage"] == "train" and trained.info.status == "FINISHED"


def test_szegedy_sgd_reg_sweep(mnist_root, store, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    args = [*SMALL, "n_eval=64", "attack=szegedy_sgd", "attack.reg=0.01,1", "attack.steps=30", "-m"]
    invoke_ok(main, args, tmp_path)
    parents, children = sweep_children(store)
    (parent,) = parents
    kids = {float(k.data.params["attack.reg"]): k for k in children[parent.info.run_id]}
    assert sorted(kids) == [0.01, 1.0] and parent.info.status == "FINISHED"
    for kid in kids.values():
        metrics = kid.data.metrics
        assert kid.info.status == "FINISHED" and "eps" not in metrics
        assert set(METRIC_KEYS) - {"eps"} <= set(metrics)
        assert metrics["forward_passes_per_image"] == metrics["backward_passes_per_image"] == 30
        assert kid.data.params["attack.targeted"] == "True"
    assert kids[1.0].data.metrics["l2_mean"] < kids[0.01].data.metrics["l2_mean"]
    summary = MlflowClient(store).list_artifacts(parent.info.run_id)
    assert {"summary_success_accuracy.png", "summary_l2.png"} <= {a.path for a in summary}


@pytest.mark.slow
def test_lbfgs_as_typed(mnist_root, store, tmp_path):
    done = cli(["attack=lbfgs", *small_overrides(tmp_path), "n_eval=48", "attack.c_steps=5"], store)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = [r for r in all_runs(store) if r.data.tags.get("stage") == "attack"]
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["attack.name"] == "lbfgs"
    assert set(METRIC_KEYS) - {"eps"} <= set(metrics) and "eps" not in metrics
    assert metrics["success_rate"] > 0.9 and metrics["c_final_median"] > 0
    assert metrics["szegedy_distortion_mean"] == pytest.approx(
        metrics["l2_mean"] / 28, rel=0.5
    )  # distortion = L2 / sqrt(784), success-only mean
    assert metrics["forward_passes_per_image"] > 10
    assert "examples.png" in {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_szegedy_table1_experiment_and_table(mnist_root, store, tmp_path, capsys, monkeypatch):
    from pipeline.papers.table1 import PAPER
    from pipeline.papers.table1 import main as table1_main

    monkeypatch.setattr(sys, "argv", sys.argv)
    invoke_ok(
        main,
        [*SMALL, "n_eval=16", "experiment=szegedy_table1", "attack.c_steps=3", "attack.max_iter=20", "-m"],
        tmp_path,
    )
    parents, children = sweep_children(store)
    (parent,) = parents
    kids = children[parent.info.run_id]
    assert sorted(k.data.params["model.name"] for k in kids) == sorted(PAPER)
    assert {k.data.params["attack.name"] for k in kids} == {"lbfgs"}
    decay = {k.data.params["model.name"]: k.data.params["train.weight_decay"] for k in kids}
    assert decay == {
        "fc10_1e-4": "0.0001",
        "fc10_1e-2": "0.01",
        "fc10_1": "1",
        "fc100_100": "0.0",
        "fc200_200": "0.0",
    }
    assert {"summary_success_accuracy.png"} <= {
        a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id)
    }

    capsys.readouterr()
    invoke_ok(table1_main, [], tmp_path)
    printed = capsys.readouterr().out
    for name, error, distortion in PAPER.values():
        assert f"| {name} | {error:.2f}% |" in printed and f"| {distortion:.3f} |" in printed
    assert printed.count("| 16 |") == 5
    assert "table1.md" in {a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id)}


def test_table1_without_a_sweep_is_a_clear_error(store, tmp_path, capsys, monkeypatch):
    from pipeline.papers.table1 import main as table1_main

    monkeypatch.setattr(sys, "argv", sys.argv)
    assert invoke(table1_main, [], tmp_path) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: no experiment=szegedy_table1 sweep in") and "make table1" in line


@pytest.mark.slow
def test_sweep_over_attacks_and_eps_draws_one_line_per_attack(mnist_root, store, tmp_path):
    result = cli(["attack=fgsm,pgd", "eps=0.1,0.2", *small_overrides(tmp_path), "-m"], store)
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_children(store)
    (parent,) = parents
    kids = children[parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(kids) == 4
    assert parent.data.tags["sweep.swept_keys"] == "attack,eps"
    client = MlflowClient(store)
    assert {"summary_success_accuracy.png", "summary_series.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    series = json.loads(
        open(client.download_artifacts(parent.info.run_id, "summary_series.json", str(tmp_path))).read()
    )
    for metric in ("adv_accuracy", "success_rate"):
        assert set(series[metric]) == {"attack=fgsm", "attack=pgd"}
        for line in series[metric].values():
            assert line["eps"] == [0.1, 0.2]
    # PGD (40 steps in the same ball) is at least as strong as FGSM at every eps
    fgsm_acc, pgd_acc = (series["adv_accuracy"][f"attack={a}"]["adv_accuracy"] for a in ("fgsm", "pgd"))
    assert all(p <= f for p, f in zip(pgd_acc, fgsm_acc, strict=True)) and pgd_acc[1] < fgsm_acc[1]
