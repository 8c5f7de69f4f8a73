"""The team tracking server (`python -m pipeline.tracking.server`, what `make server` runs): logins,
rights per experiment, other machines, the pipeline's one-line errors, and sweeps that survive the
server going away. Every server is real and listens on a loopback port (or on an address inside a
network namespace the test makes)."""

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from pipeline.tracking import server
from tests.conftest import (
    PROJECT_ROOT,
    SMALL,
    Served,
    all_runs,
    small_overrides,
    start_server,
    stop_server,
)
from tests.test_cli import invoke_ok, sweep_children


def status(url: str, login: dict[str, str] | None = None, host: str | None = None) -> int:
    """The HTTP status of GET `url`, as `login` (MLFLOW_TRACKING_USERNAME/PASSWORD) if given."""
    request = urllib.request.Request(url)
    if login is not None:
        pair = f"{login['MLFLOW_TRACKING_USERNAME']}:{login['MLFLOW_TRACKING_PASSWORD']}"
        request.add_header("Authorization", "Basic " + b64encode(pair.encode()).decode())
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def login(user: str, password: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}


def pipeline(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` as a user types it, with `env` on top of this environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def users(served: Served, *args: str, as_login: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline.tracking.users ARGS` against `served`, as its admin unless told."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.tracking.users", *args],
        cwd=PROJECT_ROOT,
        env={**clean, "MLFLOW_TRACKING_URI": served.uri, **(as_login or served.admin)},
        capture_output=True,
        text=True,
        timeout=120,
    )


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def test_only_logged_in_users_get_in(mlflow_server):
    served = mlflow_server
    admin_file = served.home / server.ADMIN_FILE
    assert stat.S_IMODE(admin_file.stat().st_mode) == 0o600  # the generated admin login
    assert "admin login in" in (served.home / "server.log").read_text()
    for path in (SEARCH, ARTIFACTS, "/"):
        assert status(served.uri + path) == 401
        assert status(served.uri + path, login("admin", "not-the-password")) == 401
    assert status(served.uri + SEARCH, served.admin) == 200
    assert status(served.uri + ARTIFACTS, served.admin) == 200
    assert status(served.uri + "/health") == 200  # what the pipeline probes before logging in
    # a host name the server was not told about is refused (DNS rebinding), a private address is not
    assert status(served.uri + SEARCH, served.admin, host=f"team-box:{served.port}") == 403
    assert status(served.uri + SEARCH, served.admin, host=f"10.1.2.3:{served.port}") == 200


def test_a_reader_reads_but_cannot_log_until_given_edit(mlflow_server, tmp_path, monkeypatch):
    served = mlflow_server
    added = users(served, "add", "reader")
    assert added.returncode == 0, added.stderr
    password = added.stdout.split("with password ")[1].split()[0]
    reader = login("reader", password)
    admin_client = MlflowClient(served.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", served.admin["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", served.admin["MLFLOW_TRACKING_PASSWORD"])
    experiment = admin_client.create_experiment("shared")
    run = admin_client.create_run(experiment).info.run_id
    admin_client.log_metric(run, "accuracy", 0.9)
    granted = users(served, "grant", "reader", "shared", "READ")
    assert granted.returncode == 0 and "READ on experiment 'shared'" in granted.stdout

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    as_reader = MlflowClient(served.uri)
    assert as_reader.get_run(run).data.metrics == {"accuracy": 0.9}
    with pytest.raises(Exception, match="403"):
        as_reader.log_metric(run, "accuracy", 0.1)
    with pytest.raises(Exception, match="403"):
        as_reader.create_run(experiment)
    denied = users(served, "add", "someone", as_login=reader)  # only an admin manages logins
    assert denied.returncode == 2 and "is not an admin" in denied.stderr

    # through the real CLI: one line with the fix, exit 2, no run left behind in the experiment
    job = pipeline(
        [*small_overrides(tmp_path, "n_eval=32"), "tracking.experiment=shared"],
        {"MLFLOW_TRACKING_URI": served.uri, **reader},
    )
    assert job.returncode == 2
    (line,) = job.stderr.strip().splitlines()[-1:]
    assert line == (
        f"error: user 'reader' may not write to experiment 'shared' on {served.uri}; ask its owner or "
        "an admin to run `python -m pipeline.tracking.users grant reader shared EDIT`, or pass "
        "tracking.experiment=NAME to log to an experiment of your own"
    )
    assert [r.info.run_id for r in as_reader.search_runs([experiment])] == [run]
    assert users(served, "grant", "reader", "shared", "edit").returncode == 0
    as_reader.log_metric(as_reader.create_run(experiment).info.run_id, "accuracy", 0.5)


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, "requires a login; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        (login("admin", "wrong"), "refused the login of user 'admin' (wrong username or password)"),
    ],
)
def test_a_missing_or_wrong_password_is_one_line(mlflow_server, tmp_path, given, expected):
    served = mlflow_server
    before = len(all_runs_as_admin(served))
    job = pipeline(
        [*small_overrides(tmp_path), "eps=0.1,0.2", "-m"], {"MLFLOW_TRACKING_URI": served.uri, **given}
    )
    assert job.returncode == 2 and "Traceback" not in job.stderr
    line = job.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: MLflow tracking server {served.uri} ") and expected in line
    assert len(all_runs_as_admin(served)) == before  # nothing was started


def all_runs_as_admin(served: Served) -> list:
    saved = {k: os.environ.get(k) for k in served.admin}
    os.environ.update(served.admin)
    try:
        return all_runs(served.uri)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.slow
def test_a_sweep_goes_to_the_server_and_reads_back_over_http(as_admin, mnist_root, tmp_path, monkeypatch):
    uri = as_admin.uri
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
    assert list(as_admin.artifacts.rglob(artifact))  # stored by the server, not by the client
    assert not (tmp_path / "client" / "mlartifacts").exists()


def test_the_server_command_line(tmp_path, monkeypatch):
    """Logins on by default, the admin login written once (0600) or taken from the environment,
    host names for other machines, and --insecure as the only way to serve without logins."""
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    home = tmp_path / "home"
    argv, env, message = server.prepare(server.parse(["--dir", str(home), "--host", "0.0.0.0"]))
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    hosts = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert {"localhost", "127.0.0.1", "10.*", server.socket.gethostname() + ":*"} <= set(hosts)
    first = server.read_env_file(home / server.ADMIN_FILE)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == first["MLFLOW_TRACKING_PASSWORD"]
    assert len(first["MLFLOW_TRACKING_PASSWORD"]) >= 20
    for private in (server.ADMIN_FILE, "basic_auth.ini", "flask_secret_key"):
        assert stat.S_IMODE((home / private).stat().st_mode) == 0o600
    assert f"database_uri = sqlite:///{home.resolve()}/basic_auth.db" in (home / "basic_auth.ini").read_text()
    assert str(home / server.ADMIN_FILE) in message
    _, again, _ = server.prepare(server.parse(["--dir", str(home)]))
    assert again["MLFLOW_AUTH_ADMIN_PASSWORD"] == first["MLFLOW_TRACKING_PASSWORD"]  # written once

    named = server.parse(
        ["--dir", str(home), "--allowed-hosts", "mlflow.lab.org", "--cors-allowed-origins", "https://x.org"]
    )
    argv, _, _ = server.prepare(named)
    assert {"mlflow.lab.org", "mlflow.lab.org:*"} <= set(argv[argv.index("--allowed-hosts") + 1].split(","))
    assert argv[argv.index("--cors-allowed-origins") + 1] == "https://x.org"

    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-environment")
    _, env, message = server.prepare(server.parse(["--dir", str(tmp_path / "other")]))
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "from-the-environment"
    assert not (tmp_path / "other" / server.ADMIN_FILE).exists() and "MLFLOW_AUTH_ADMIN_PASSWORD" in message

    argv, env, message = server.prepare(server.parse(["--dir", str(tmp_path / "open"), "--insecure"]))
    assert "--app-name" not in argv and "MLFLOW_AUTH_CONFIG_PATH" not in env and "no logins" in message
    assert not (tmp_path / "open" / server.ADMIN_FILE).exists()


def test_lost_connections_are_explained_for_servers_only():
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.store import explain

    lost = MlflowException(
        "API request to http://127.0.0.1:5999/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url: /x (Caused by "
        'NewConnectionError("Failed to establish a new connection: [Errno 111] Connection refused"))'
    )
    explained = explain(lost, "http://127.0.0.1:5999")
    assert explained is not None and explained.gone
    assert str(explained).startswith(
        "MLflow tracking server http://127.0.0.1:5999 stopped answering ([Errno 111] Connection refused); "
    )
    assert explain(lost, "sqlite:///outputs/mlflow.db") is None  # not a server: not this advice
    assert explain(MlflowException("Run 'x' not found"), "http://127.0.0.1:5999") is None


def fgsm_paused(model, x, y, eps, **kwargs):
    """FGSM that, at eps 0.1 and while PAUSE_DIR is set, says it is running and waits for `go`."""
    from pipeline.attacks import fgsm

    pause = os.environ.get("PAUSE_DIR")
    values = eps if isinstance(eps, list | tuple) else [eps]
    if pause and any(abs(float(e) - 0.1) < 1e-9 for e in values):
        Path(pause, "paused").touch()
        deadline = time.monotonic() + 300
        while not Path(pause, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    return fgsm(model, x, y, eps, **kwargs)


class Output:
    """A process's stdout, read as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.text += line

    def wait_for(self, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            assert process.poll() is None or text in self.text, self.text[-3000:]
            assert time.monotonic() < deadline, f"never printed {text!r}: {self.text[-3000:]}"
            time.sleep(0.2)


def wait_for_file(path: Path, process: subprocess.Popen, output: Output, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, output.text[-3000:]
        assert time.monotonic() < deadline, output.text[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_a_sweep_survives_the_server_stopping_and_restarting(mnist_root, tmp_path, monkeypatch):
    """The server stops while the second of three points runs and comes back: that point fails
    with one line, the third waits for the server, closes the second's run FAILED and finishes,
    and the rerun finishes the second: three FINISHED runs, none RUNNING, none twice."""
    served = start_server(tmp_path / "server")
    args = [
        *small_overrides(tmp_path / "client", "n_eval=64", "cpu_workers=1"),
        "attack.function=tests.test_server.fgsm_paused",
        "eps=0.05,0.1,0.2",
        "tracking.experiment=restarts",
        "-m",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")},
        **served.admin,
        "MLFLOW_TRACKING_URI": served.uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # the point in flight gives up at once
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "PYTHONUNBUFFERED": "1",
    }
    pause = tmp_path / "pause"
    pause.mkdir()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=PROJECT_ROOT,
        env={**env, "PAUSE_DIR": str(pause)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(sweep)
    try:
        wait_for_file(pause / "paused", sweep, output)  # the second point is attacking
        stop_server(served)
        (pause / "go").touch()
        output.wait_for("waiting up to 300 s for the MLflow tracking server", sweep)
        served = start_server(served.home, served.port)
        assert sweep.wait(timeout=300) == 2
    finally:
        if sweep.poll() is None:
            sweep.kill()
    output.thread.join(timeout=10)
    assert f"MLflow tracking server {served.uri} stopped answering" in output.text
    try:
        for key, value in served.admin.items():
            monkeypatch.setenv(key, value)
        (parent,), children = sweep_children(served.uri, "restarts")
        kids = children[parent.info.run_id]
        by_state = {k.data.params["eps"]: k.info.status for k in kids}
        assert by_state == {"0.05": "FINISHED", "0.1": "FAILED", "0.2": "FINISHED"}  # 0.1 closed by 0.2
        (failed,) = [k for k in kids if k.info.status == "FAILED"]
        assert "stopped answering" in failed.data.tags["error"]

        rerun = pipeline(args, {k: v for k, v in env.items() if k.startswith("MLFLOW_")})
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "2 of 3 points already done" in rerun.stdout
        (parent,), children = sweep_children(served.uri, "restarts")
        kids = children[parent.info.run_id]
        finished = [k for k in kids if k.info.status == "FINISHED"]
        assert parent.info.status == "FINISHED"
        assert sorted(k.data.params["eps"] for k in finished) == ["0.05", "0.1", "0.2"]
        assert [k.info.status for k in kids if k not in finished] == ["FAILED"]
        assert not [r for r in all_runs(served.uri) if r.info.status == "RUNNING"]
        client = MlflowClient(served.uri)
        for kid in finished:
            assert f"examples_eps{kid.data.params['eps']}.png" in {
                a.path for a in client.list_artifacts(kid.info.run_id)
            }
    finally:
        stop_server(served)


NAMESPACE, HOST_SIDE, CLIENT_SIDE = "advex-test", "10.231.7.1", "10.231.7.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespace():
    """A network namespace joined to this one by a veth pair: HOST_SIDE here, CLIENT_SIDE there;
    inside it the names `advex-team` and `unlisted-name` both resolve to HOST_SIDE."""
    if shutil.which("ip") is None:
        pytest.fail("iproute2 is missing: apt-get install -y iproute2")
    for leftover in (["link", "del", "advex-host"], ["netns", "del", NAMESPACE]):  # of a killed run
        subprocess.run(["ip", *leftover], capture_output=True)
    try:
        _ip("netns", "add", NAMESPACE)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"no network namespace can be made here ({error.stderr.strip()}): needs root")
    hosts = Path("/etc/netns") / NAMESPACE / "hosts"  # `ip netns exec` mounts it over /etc/hosts
    try:
        _ip("link", "add", "advex-host", "type", "veth", "peer", "name", "advex-client")
        _ip("link", "set", "advex-client", "netns", NAMESPACE)
        _ip("addr", "add", f"{HOST_SIDE}/24", "dev", "advex-host")
        _ip("link", "set", "advex-host", "up")
        _ip("netns", "exec", NAMESPACE, "ip", "addr", "add", f"{CLIENT_SIDE}/24", "dev", "advex-client")
        _ip("netns", "exec", NAMESPACE, "ip", "link", "set", "advex-client", "up")
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{HOST_SIDE} advex-team unlisted-name\n")
        yield
    finally:
        subprocess.run(["ip", "link", "del", "advex-host"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
        shutil.rmtree(hosts.parent, ignore_errors=True)


CLIENT = """
import sys, urllib.request, urllib.error
from base64 import b64encode
url, user, password = sys.argv[1:4]
request = urllib.request.Request(url)
if user:
    request.add_header("Authorization", "Basic " + b64encode(f"{user}:{password}".encode()).decode())
try:
    print(urllib.request.urlopen(request, timeout=10).status)
except urllib.error.HTTPError as error:
    print(error.code)
"""


@pytest.mark.slow
def test_a_client_on_another_machine_gets_in_by_name_with_its_login(namespace, tmp_path):
    served = start_server(tmp_path / "server", None, "--allowed-hosts", "advex-team", host=HOST_SIDE)
    try:
        admin = served.admin

        def from_the_namespace(host: str, user: str = "", password: str = "") -> int:
            url = f"http://{host}:{served.port}{SEARCH}"
            done = subprocess.run(
                ["ip", "netns", "exec", NAMESPACE, sys.executable, "-c", CLIENT, url, user, password],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            return int(done.stdout)

        user, password = admin["MLFLOW_TRACKING_USERNAME"], admin["MLFLOW_TRACKING_PASSWORD"]
        assert from_the_namespace("advex-team", user, password) == 200  # by the name it was given
        assert from_the_namespace(HOST_SIDE, user, password) == 200  # by address
        assert from_the_namespace("advex-team") == 401  # no login
        assert from_the_namespace("advex-team", user, "wrong") == 401
        assert from_the_namespace("unlisted-name", user, password) == 403  # a name it was not given
    finally:
        stop_server(served)
