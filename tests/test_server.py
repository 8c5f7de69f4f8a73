"""A real MLflow tracking server (`python -m pipeline.tracking.server`, what `make server` runs): a parallel
sweep against it over HTTP, read back over HTTP."""

import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from tests.conftest import SMALL
from tests.test_cli import invoke_ok, sweep_children


@pytest.mark.slow
def test_a_sweep_goes_to_the_server_and_reads_back_over_http(
    mlflow_server, mnist_root, tmp_path, monkeypatch
):
    uri, served = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(sys, "argv", sys.argv)
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]  # two workers writing at once
    invoke_ok(
        main,
        [*SMALL, "n_eval=64", "eps=0.1,0.2", *parallel, "tracking.experiment=served", "-m"],
        tmp_path / "client",
    )
    (parent,), children = sweep_children(uri, "served")
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
