"""`python -m pipeline.tracking.server` (`make server`): a shared MLflow tracking server.

Runs go to a database backend store (sqlite under outputs/server/ by default; any SQLAlchemy
URI such as `postgresql://user:password@host:5432/mlflow` works) and artifacts to an artifact
root the server serves itself, so clients need nothing but `MLFLOW_TRACKING_URI=http://host:port`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pipeline.config import PROJECT_ROOT

SERVER_DIR = PROJECT_ROOT / "outputs" / "server"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tracking.server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--store",
        default=f"sqlite:///{SERVER_DIR / 'mlflow.db'}",
        help="backend store URI (default: %(default)s)",
    )
    parser.add_argument(
        "--artifacts",
        default=str(SERVER_DIR / "artifacts"),
        help="where the server keeps artifacts (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.store.startswith("sqlite:///"):
        Path(args.store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    argv_server = command(args.store, args.artifacts, args.host, args.port, args.workers)
    print(
        f"MLflow server on http://{args.host}:{args.port} (store {args.store}, artifacts "
        f"{args.artifacts}); point the pipeline at it with "
        f"MLFLOW_TRACKING_URI=http://{args.host}:{args.port}",
        flush=True,
    )
    os.execv(argv_server[0], argv_server)


if __name__ == "__main__":
    main()
