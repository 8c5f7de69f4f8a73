"""Sweeps that survive faults: resume without duplicates, SIGTERM/SIGKILL mid-sweep, flat memory."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from pipeline.__main__ import main
from pipeline.config import config_hash, sweep_key
from tests.conftest import PROJECT_ROOT, SMALL, all_runs, make_config, small_overrides
from tests.test_cli import invoke_ok, sweep_children


def test_config_hash_ignores_how_and_where_a_job_runs(tmp_path):
    base = make_config(small_overrides(tmp_path))
    same = make_config(
        [
            *small_overrides(tmp_path / "elsewhere"),
            "cpu_workers=1",
            "resume=false",
            "trainer.enable_progress_bar=true",
        ]
    )
    assert config_hash(base) == config_hash(same)
    for changed in ("eps=0.2", "seed=1", "attack=pgd", "attack.targeted=true", "n_eval=100"):
        assert config_hash(make_config(small_overrides(tmp_path, changed))) != config_hash(base), changed
    assert sweep_key(["eps=0.1,0.2", "attack=fgsm"]) == sweep_key(
        ["attack=fgsm", "resume=false", "eps=0.1,0.2", "paths.outputs=/x"]
    )
    assert sweep_key(["eps=0.1,0.2"]) != sweep_key(["eps=0.1,0.3"])


def test_a_rerun_sweep_skips_its_finished_points_and_resume_false_starts_afresh(
    mnist_root, store, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", sys.argv)
    sweep = [*SMALL, "n_eval=64", "eps=0.05,0.1", "-m"]
    invoke_ok(main, sweep, tmp_path)
    (first,), _ = sweep_children(store)
    capsys.readouterr()

    invoke_ok(main, sweep, tmp_path)  # everything done: nothing runs, nothing is added
    assert f"resuming sweep {first.info.run_id}: 2 of 2 points already done" in capsys.readouterr().out
    (parent,), children = sweep_children(store)
    assert parent.info.run_id == first.info.run_id and parent.info.status == "FINISHED"
    assert len(children[parent.info.run_id]) == 2
    assert parent.data.metrics["jobs_skipped"] == 2 and parent.data.metrics["children_finished"] == 2

    invoke_ok(main, [*sweep[:-1], "resume=false", "-m"], tmp_path)
    parents, children = sweep_children(store)
    assert len(parents) == 2 and all(len(kids) == 2 for kids in children.values())
    metrics = {
        p: {k.data.params["eps"]: k.data.metrics["adv_accuracy"] for k in kids}
        for p, kids in children.items()
    }
    assert len({tuple(sorted(m.items())) for m in metrics.values()}) == 1  # same numbers again


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_marks_the_run_killed_and_the_process_exits(
    sig, mnist_root, store, tmp_path, monkeypatch
):
    """SIGTERM or Ctrl-C inside a job (here: sent by the attack itself) ends the job's run and
    the sweep's parent KILLED, with exit status 128 + the signal's number."""
    monkeypatch.setenv("STOP_SIGNAL", str(int(sig)))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pipeline",
            *small_overrides(tmp_path, "n_eval=64", "cpu_workers=1"),
            "attack.function=tests.test_reliability.self_stopping_fgsm",
            "eps=0.05,0.1",
            "-m",
        ],
    )
    from pipeline.cli import entrypoint

    with pytest.raises(SystemExit) as exit_info:
        entrypoint(main)
    assert exit_info.value.code == 128 + sig
    runs = {r.data.tags.get("stage"): r for r in all_runs(store)}
    assert runs["attack"].info.status == "KILLED" and sig.name in runs["attack"].data.tags["error"]
    assert runs["sweep"].info.status == "KILLED"
    assert runs["train"].info.status == "FINISHED"


def self_stopping_fgsm(model, x, y, eps, **kwargs):
    os.kill(os.getpid(), int(os.environ["STOP_SIGNAL"]))
    time.sleep(5)  # the signal arrives before this ends
    raise AssertionError("the signal was not delivered")


class _SignalsWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100_000):  # the handler runs in here, and Python ignores what it raises
            pass


def fgsm_stopped_in_a_finaliser(model, x, y, eps, **kwargs):
    _SignalsWhenCollected()  # collected at once
    from pipeline.attacks import fgsm

    return fgsm(model, x, y, eps, **kwargs)


def test_a_stop_raised_where_python_ignores_exceptions_still_stops_the_sweep(
    mnist_root, store, tmp_path, monkeypatch
):
    """A signal handler can run inside a finaliser or a weakref callback, where its exception is
    printed and dropped: the stop still ends the sweep at the next batch or job, as KILLED."""
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pipeline",
            *small_overrides(tmp_path, "n_eval=64", "cpu_workers=1"),
            "attack.function=tests.test_reliability.fgsm_stopped_in_a_finaliser",
            "eps=0.05,0.1",
            "-m",
        ],
    )
    from pipeline.cli import entrypoint

    with pytest.raises(SystemExit) as exit_info:
        entrypoint(main)
    assert exit_info.value.code == 128 + signal.SIGTERM
    attacks = [r for r in all_runs(store) if r.data.tags.get("stage") == "attack"]
    assert len(attacks) == 1  # the second point never started
    (parent,) = [r for r in all_runs(store) if r.data.tags.get("stage") == "sweep"]
    assert parent.info.status == "KILLED"


KILL_SWEEP = ["attack=bim", "attack.steps=20", "n_eval=600", "eps=0.02,0.04,0.06,0.08"]


def _start(args, store):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when_a_second_point_runs(process, store, sig, finished_before: int, timeout=300):
    """Send `sig` once more than `finished_before` points finished and another one is RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        kids = [r for r in all_runs(store) if r.data.tags.get("stage") == "attack"]
        states = Counter(r.info.status for r in kids)
        if states["FINISHED"] > finished_before and states["RUNNING"]:
            process.send_signal(sig)
            return process.communicate(timeout=120)
        time.sleep(0.3)
    process.kill()
    raise AssertionError("the sweep never reached a second point")


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_duplicates(mnist_root, store, tmp_path):
    args = [*KILL_SWEEP, *small_overrides(tmp_path), "-m"]

    first = _start(args, store)
    _, err = _kill_when_a_second_point_runs(first, store, signal.SIGTERM, finished_before=0)
    assert first.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM: open runs are marked KILLED" in err
    (parent,), children = sweep_children(store)
    assert parent.info.status == "KILLED"
    killed = [k for k in children[parent.info.run_id] if k.info.status == "KILLED"]
    assert len(killed) == 1 and "SIGTERM" in killed[0].data.tags["error"]
    done_before = sum(k.info.status == "FINISHED" for k in children[parent.info.run_id])

    second = _start(args, store)  # resumes, then dies without any chance to clean up
    out, _ = _kill_when_a_second_point_runs(second, store, signal.SIGKILL, finished_before=done_before)
    assert second.returncode == -signal.SIGKILL
    assert f"{done_before} of 4 points already done" in out

    third = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        text=True,
        capture_output=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        timeout=600,
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert "points already done" in third.stdout
    (parent,), children = sweep_children(store)
    kids = children[parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.metrics["children_finished"] == 4
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert sorted(k.data.params["eps"] for k in finished) == ["0.02", "0.04", "0.06", "0.08"]
    assert len({k.data.tags["config_hash"] for k in finished}) == 4  # no point finished twice
    killed = [k for k in kids if k.info.status == "KILLED"]
    assert len(killed) == 2 and not [k for k in kids if k.info.status == "RUNNING"]
    assert any("ended without closing the run" in k.data.tags["error"] for k in killed)
    assert len([r for r in all_runs(store) if r.data.tags.get("stage") == "train"]) == 1


def test_memory_stays_flat_across_the_jobs_of_a_sweep(mnist_root, store, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    invoke_ok(main, [*SMALL, "n_eval=1000", "eps=0.02,0.04,0.06,0.08,0.1", "-m"], tmp_path)
    (parent,), children = sweep_children(store)
    by_eps = sorted(children[parent.info.run_id], key=lambda k: float(k.data.params["eps"]))
    rss = [k.data.metrics["rss_mb"] for k in by_eps]
    peaks = [k.data.metrics["peak_rss_mb"] for k in by_eps]
    assert all(peak >= now > 0 for peak, now in zip(peaks, rss, strict=True))
    # the first job also trains the model and warms caches; later jobs must not grow
    assert max(rss[1:]) - rss[1] < 40, rss
