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
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Served:
    """A running `python -m pipeline.tracking.server`: its URI, folder, artifact root, admin login."""

    uri: str
    home: Path
    process: subprocess.Popen
    port: int

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

    @property
    def admin(self) -> dict[str, str]:
        """MLFLOW_TRACKING_USERNAME/PASSWORD of the admin, as the server wrote them."""
        from pipeline.tracking.server import ADMIN_FILE, read_env_file

        return read_env_file(self.home / ADMIN_FILE)


def start_server(home: Path, port: int | None = None, *options: str, host: str = "127.0.0.1") -> Served:
    """`python -m pipeline.tracking.server` (what `make server` runs) with its folder `home`, on a
    free port (or `port`), once it answers."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "server.log").open("a")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.tracking.server",
            "--dir",
            str(home),
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
            *options,
        ],
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    served = Served(f"http://{host}:{port}", home, process, port)
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{served.uri}/health", timeout=2).close()
            return served
        except OSError:
            assert process.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer within 180 s"
            time.sleep(0.5)


def stop_server(served: Served) -> None:
    os.killpg(served.process.pid, signal.SIGTERM)  # the server and its workers
    served.process.wait(timeout=60)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real tracking server with logins (what `make server` runs) on a free loopback port, shared
    by the tests that need one (each uses its own experiment)."""
    served = start_server(tmp_path_factory.mktemp("server"))
    yield served
    stop_server(served)


@pytest.fixture
def as_admin(mlflow_server, monkeypatch) -> Served:
    """The shared server, with this test's clients logged in as its admin."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    for key, value in mlflow_server.admin.items():
        monkeypatch.setenv(key, value)
    return mlflow_server


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
