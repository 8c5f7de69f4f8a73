"""`python -m pipeline.tracking.users` (`make users USERS=...`): the logins of a `make server`.

    add NAME [--password P]            a new user (a password is generated and printed if not given)
    grant NAME EXPERIMENT PERMISSION   READ, EDIT, MANAGE or NO_PERMISSIONS on one experiment
    password NAME [--password P]       a new password
    admin NAME [--revoke]              make a user an admin (or not)

It talks to the server at MLFLOW_TRACKING_URI (default http://127.0.0.1:5000) as an admin: the
login in MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, else the one `make server` wrote to
outputs/server/admin.env.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import warnings

from pipeline.tracking.server import ADMIN_FILE, PERMISSIONS, SERVER_DIR, read_env_file


def _admin_login() -> None:
    """Use the admin login `make server` wrote when the environment names none."""
    admin_file = SERVER_DIR / ADMIN_FILE
    if "MLFLOW_TRACKING_USERNAME" not in os.environ and admin_file.exists():
        os.environ.update(read_env_file(admin_file))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tracking.users",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    actions = parser.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="a new user")
    add.add_argument("name")
    add.add_argument("--password")
    grant = actions.add_parser("grant", help="a user's right on one experiment")
    grant.add_argument("name")
    grant.add_argument("experiment")
    grant.add_argument("permission", type=str.upper, choices=PERMISSIONS)
    password = actions.add_parser("password", help="a new password")
    password.add_argument("name")
    password.add_argument("--password")
    admin = actions.add_parser("admin", help="make a user an admin (or not, with --revoke)")
    admin.add_argument("name")
    admin.add_argument("--revoke", action="store_true")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    """Do what `args` says; return the sentence to print."""
    with warnings.catch_warnings():  # the server package's own imports warn about starlette
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow.server import get_app_client
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.errors import TrackingError
    from pipeline.tracking.store import _probe, explain

    _probe(args.uri)
    auth = get_app_client("basic-auth", tracking_uri=args.uri)
    try:
        if args.action in ("add", "password"):
            new = args.password or secrets.token_urlsafe(12)
            if args.action == "add":
                auth.create_user(args.name, new)
                done = f"added user {args.name}"
            else:
                auth.update_user_password(args.name, new)
                done = f"new password for user {args.name}"
            shown = "" if args.password else f" with password {new} (shown once)"
            return (
                f"{done}{shown}; they log in with MLFLOW_TRACKING_USERNAME={args.name} "
                "MLFLOW_TRACKING_PASSWORD=..."
            )
        if args.action == "grant":
            experiment = MlflowClient(args.uri).get_experiment_by_name(args.experiment)
            if experiment is None:
                raise TrackingError(
                    f"no experiment '{args.experiment}' on {args.uri}; create it first (an admin's "
                    "run creates it) or check the name"
                )
            try:
                auth.grant_user_permission(args.name, "experiment", experiment.experiment_id, args.permission)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                auth.revoke_user_permission(args.name, "experiment", experiment.experiment_id)  # a change
                auth.grant_user_permission(args.name, "experiment", experiment.experiment_id, args.permission)
            return f"user {args.name} has {args.permission} on experiment '{args.experiment}'"
        auth.update_user_admin(args.name, not args.revoke)
        return f"user {args.name} is {'no longer ' if args.revoke else ''}an admin"
    except TrackingError:
        raise
    except Exception as error:
        if getattr(error, "error_code", None) == "PERMISSION_DENIED":
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingError(
                f"user '{user}' is not an admin of {args.uri}; log in as an admin (MLFLOW_TRACKING_USERNAME/"
                f"MLFLOW_TRACKING_PASSWORD, or outputs/server/{ADMIN_FILE} on the server's machine)"
            ) from error
        explained = explain(error, args.uri)
        if explained is not None:
            raise explained from error
        code = getattr(error, "error_code", None)
        if code == "RESOURCE_ALREADY_EXISTS":
            raise TrackingError(
                f"user {args.name} already exists on {args.uri}; `password {args.name}` gives them "
                "a new password"
            ) from error
        if code == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(
                f"no user {args.name} on {args.uri}; `add {args.name}` creates them"
            ) from error
        raise


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    _admin_login()
    from pipeline.errors import PipelineError

    try:
        print(run(args))
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
