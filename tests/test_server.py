"""A real MLflow tracking server (`python -m pipeline.server`, what `make server` runs): a parallel
sweep against it over HTTP, read back over HTTP."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from tests.conftest import PROJECT_ROOT, SMALL
from tests.test_bad_inputs import _free_port
from tests.test_cli import invoke_ok, sweep_children


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.server", "--store", f"sqlite:///{tmp_path}/server.db",
         "--artifacts", str(tmp_path / "served"), "--port", str(port), "--workers", "1"],
        cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            break
        except OSError:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not answer within 120 s"
            time.sleep(0.5)
    yield uri, tmp_path / "served"
    os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
    process.wait(timeout=60)
    log.close()


@pytest.mark.slow
def test_a_sweep_goes_to_the_server_and_reads_back_over_http(server, mnist_root, tmp_path, monkeypatch):
    uri, served = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "argv", sys.argv)
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]  # two workers writing at once
    invoke_ok(main, [*SMALL, "n_eval=64", "eps=0.1,0.2", *parallel, "-m"], tmp_path / "client")
    (parent,), children = sweep_children(uri)
    kids = children[parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(kids) == 2 and parent.data.metrics["jobs"] == 2
    assert all(k.info.status == "FINISHED" for k in kids)
    client = MlflowClient(uri)
    artifact = f"examples_eps{kids[0].data.params['eps']}.png"
    assert artifact in {a.path for a in client.list_artifacts(kids[0].info.run_id)}
    local = client.download_artifacts(kids[0].info.run_id, artifact, str(tmp_path))
    assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert list(served.rglob(artifact))  # stored by the server, not by the client
    assert not (tmp_path / "client" / "mlartifacts").exists()
