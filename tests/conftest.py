"""Shared fixtures: the real MNIST files, a throw-away MLflow store, small configs, a tiny trained CNN."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from pipeline.config import CONFIG_DIR, PROJECT_ROOT, attack_defaults
from pipeline.data.mnist import ensure_mnist

DATA_ROOT = PROJECT_ROOT / "outputs" / "data"

# overrides that make a whole train+attack job take seconds
SMALL = [
    "train.n_train=2000",
    "train.epochs=1",
    "train.batch_size=64",
    "train.log_every_n_steps=5",
    "n_eval=200",
    "attack.batch_size=100",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def mnist_root():
    ensure_mnist(DATA_ROOT)
    return DATA_ROOT


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store, also seen by subprocesses through MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def small_overrides(outputs, *extra: str) -> list[str]:
    """SMALL plus outputs under `outputs` (checkpoints included) and the shared MNIST files."""
    return [*SMALL, f"paths.outputs={outputs}", f"paths.data={DATA_ROOT}", *extra]


def make_config(overrides: list[str], name: str = "config", hydra: bool = False) -> DictConfig:
    """The composed config; `hydra=True` keeps Hydra's own node (launcher, sweeper, ...)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=hydra)


_attack_defaults = functools.cache(attack_defaults)  # read once per attack


def attack_params(name: str, **overrides) -> dict:
    """The hyper-parameters of attack `name` as conf/attack/<name>.yaml sets them (keyword arguments
    of its function), with `overrides`: `pgd(model, x, y, 0.1, **attack_params("pgd", steps=5))`."""
    return {**_attack_defaults(name), **overrides}


def all_runs(uri: str, experiment: str | None = None) -> list:
    """Every run in the store (of `experiment` only, if given)."""
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments() if experiment in (None, e.name)]
    return client.search_runs(ids, max_results=10_000) if ids else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server (`python -m pipeline.tracking.server`, what `make server` runs) on a free
    loopback port, shared by the tests that need one (each uses its own experiment): its URI and
    the folder where it keeps artifacts."""
    home = tmp_path_factory.mktemp("server")
    port = free_port()
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.tracking.server",
            "--store",
            f"sqlite:///{home}/server.db",
            "--artifacts",
            str(home / "served"),
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer within 180 s"
            time.sleep(0.5)
    yield uri, home / "served"
    os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
    process.wait(timeout=60)
    log.close()


@pytest.fixture(scope="session")
def tiny_cnn(mnist_root, tmp_path_factory):
    """A small CNN trained for one epoch on 3000 images by the pipeline's own train step."""
    from pipeline.data.mnist import MNISTData
    from pipeline.models import load_classifier
    from pipeline.models.training import checkpoint_for
    from pipeline.tracking.store import Tracker

    out = tmp_path_factory.mktemp("tiny")
    cfg = make_config(small_overrides(out, "train.n_train=3000", "seed=1"))
    data = MNISTData(str(mnist_root), n_train=3000, seed=1)
    data.prepare_data()
    tracker = Tracker(f"sqlite:///{out}/mlflow.db", str(out / "artifacts"))
    model = load_classifier(checkpoint_for(cfg, data, tracker).path)
    _, eval_set = data.eval_subset(256, seed=0)
    x, y, _ = eval_set.tensors
    torch.manual_seed(0)
    return model, x, y
