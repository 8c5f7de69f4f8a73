"""`python -m pipeline.tracking.server` (`make server`): a shared MLflow tracking server that lets
in only its users.

Runs go to a database backend store (sqlite under outputs/server/ by default; any SQLAlchemy
URI such as `postgresql://user:password@host:5432/mlflow` works) and artifacts to an artifact
root the server serves itself. MLflow's basic-auth app guards every request: users, their
passwords and their rights per experiment live in `basic_auth.db` beside the store. On first
start the admin's password comes from MLFLOW_AUTH_ADMIN_PASSWORD or is generated and written to
`admin.env` (mode 0600); clients log in with MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD.
`--insecure` serves without logins (a single laptop).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

from pipeline.config import PROJECT_ROOT

SERVER_DIR = PROJECT_ROOT / "outputs" / "server"
ADMIN_FILE = "admin.env"  # MLFLOW_TRACKING_USERNAME=... and MLFLOW_TRACKING_PASSWORD=..., mode 0600
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


class ServerError(Exception):
    """A server setting that cannot work: printed as one line, exit status 2."""


def command(store: str, artifacts: str, host: str, port: int, workers: int) -> list[str]:
    """The `mlflow server` command line: database store, served artifacts, host and port."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    return [
        mlflow,
        "server",
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def is_loopback(host: str) -> bool:
    """Whether binding `host` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, names: list[str]) -> list[str]:
    """The Host headers the server accepts: MLflow's defaults (loopback and private addresses),
    this machine's names when it serves the network, and `names`, each with or without a port."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    extra = list(names)
    if not is_loopback(host):
        extra += [socket.gethostname(), socket.getfqdn()]
        if host not in ("0.0.0.0", "::"):
            extra.append(host)
    patterns = get_default_allowed_hosts()
    for name in dict.fromkeys(n for n in extra if n):
        patterns += [name] if ":" in name or "*" in name else [name, f"{name}:*"]
    return patterns


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable and writable by its owner only, or fail if it exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (the admin.env format)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def auth_environment(
    home: Path, default_permission: str, auth_cache_s: int = 60
) -> tuple[dict[str, str], str]:
    """The environment the basic-auth app starts with (its config file, the admin's login, the
    CSRF key), writing what is missing under `home`; and a sentence saying where the admin's
    login is."""
    home.mkdir(parents=True, exist_ok=True)
    secret = home / "flask_secret_key"
    if not secret.exists():
        _write_private(secret, secrets.token_urlsafe(32))
    config = home / "basic_auth.ini"
    config.unlink(missing_ok=True)
    admin_file = home / ADMIN_FILE
    from_env = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    username = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    if from_env:
        password, where = from_env, f"admin login: user {username}, password from MLFLOW_AUTH_ADMIN_PASSWORD"
    elif not admin_file.exists() and (home / "basic_auth.db").exists():
        password, where = "", f"admin login: user {username}, the password it was first given"
    else:
        if not admin_file.exists():
            password = secrets.token_urlsafe(18)
            _write_private(
                admin_file, f"MLFLOW_TRACKING_USERNAME={username}\nMLFLOW_TRACKING_PASSWORD={password}\n"
            )
        admin_file.chmod(0o600)
        login = read_env_file(admin_file)
        username, password = login["MLFLOW_TRACKING_USERNAME"], login["MLFLOW_TRACKING_PASSWORD"]
        where = (
            f"admin login in {admin_file} (readable only by you; `set -a; . {admin_file}; set +a` "
            "logs a shell in as admin)"
        )
    _write_private(
        config,
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = sqlite:///{home.resolve() / 'basic_auth.db'}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # a checked login is remembered this long per worker: without it every request pays a
        # password hash (0.3 s on 2 CPU cores); a changed password may still work elsewhere as long
        f"auth_cache_ttl_seconds = {auth_cache_s}\n",
    )
    environment = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": username,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret.read_text().strip(),
    }
    if password:
        environment["MLFLOW_AUTH_ADMIN_PASSWORD"] = password  # read on the first start only
    return environment, where


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tracking.server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=SERVER_DIR,
        help="where the store, the artifacts and the logins live (default: %(default)s)",
    )
    parser.add_argument("--store", help="backend store URI (default: sqlite:///DIR/mlflow.db)")
    parser.add_argument("--artifacts", help="where the server keeps artifacts (default: DIR/artifacts)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 serves other machines"
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--allowed-hosts",
        default="",
        help="extra comma-separated names clients use to reach the server (besides loopback, private "
        "addresses and, when serving the network, this machine's host name)",
    )
    parser.add_argument(
        "--cors-allowed-origins",
        default="",
        help="comma-separated origins whose web pages may call the server (e.g. https://dash.lab.org)",
    )
    parser.add_argument(
        "--default-permission",
        choices=PERMISSIONS,
        default="READ",
        help="what every user may do in experiments they were given no right on (default: %(default)s)",
    )
    parser.add_argument(
        "--login-cache-s",
        type=int,
        default=60,
        help="seconds a worker remembers a checked login; a changed password may work that long on "
        "other workers (0: check every request, 0.3 s each on 2 cores; default: %(default)s)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no logins: anyone who reaches the port may read, change and delete every run",
    )
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str], str]:
    """The server's command line, its environment and what to tell the user."""
    if args.insecure and not is_loopback(args.host):
        print(
            f"warning: --insecure on {args.host}: anyone who reaches port {args.port} may read, "
            "change and delete every run",
            file=sys.stderr,
        )
    home: Path = args.dir
    store = args.store or f"sqlite:///{home.resolve() / 'mlflow.db'}"
    artifacts = args.artifacts or str(home / "artifacts")
    try:
        if store.startswith("sqlite:///"):
            Path(store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ServerError(f"cannot create the server's folders ({error}); pass a writable --dir") from error
    argv = command(store, artifacts, args.host, args.port, args.workers)
    names = [n.strip() for n in args.allowed_hosts.split(",") if n.strip()]
    argv += ["--allowed-hosts", ",".join(allowed_hosts(args.host, names))]
    if args.cors_allowed_origins:
        argv += ["--cors-allowed-origins", args.cors_allowed_origins]
    environment = dict(os.environ)
    login = "no logins (--insecure)"
    if not args.insecure:
        argv += ["--app-name", "basic-auth"]
        auth, login = auth_environment(home, args.default_permission, args.login_cache_s)
        environment.update(auth)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    message = "\n".join(
        [
            f"MLflow server on http://{args.host}:{args.port} (store {store}, artifacts {artifacts})",
            login,
            f"clients: MLFLOW_TRACKING_URI=http://{shown}:{args.port}"
            + ("" if args.insecure else " with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ]
    )
    return argv, environment, message


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    try:
        argv_server, environment, message = prepare(args)
    except ServerError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(message, flush=True)
    os.execve(argv_server[0], argv_server, environment)


if __name__ == "__main__":
    main()
