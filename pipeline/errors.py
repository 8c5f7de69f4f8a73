"""User-facing errors: each carries one line saying what is wrong and how to fix it.

`python -m pipeline` prints `error: <message>` for these and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import signal
import sys

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException


def report(message: str) -> None:
    """Print a user-facing error the one way the pipeline prints them."""
    print(f"error: {message}", file=sys.stderr)


class PipelineError(Exception):
    """A problem with the user's input or environment, not with the code."""


class ConfigError(PipelineError):
    """A config value is out of range or of the wrong type."""


class DataError(PipelineError):
    """The dataset is missing, truncated or altered."""


class CheckpointError(PipelineError):
    """A checkpoint file is missing or unreadable."""


class TrackingError(PipelineError):
    """The MLflow tracking store cannot be reached or written; `gone`: a server that answered
    before stopped answering."""

    def __init__(self, message: str, gone: bool = False) -> None:
        super().__init__(message)
        self.gone = gone


class Stopped(BaseException):
    """The process was told to stop (SIGTERM, or Ctrl-C): open runs end KILLED.

    A BaseException, so neither Hydra's per-job `except Exception` nor Lightning's Ctrl-C
    handler (which turns KeyboardInterrupt into `sys.exit(1)`) swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


_received: list[int] = []  # stop signals received in this process, in order


def note_stop(signum: int) -> Stopped:
    """Remember a stop signal and return the exception that ends the work: raised by a signal
    handler it can still be lost (Python ignores exceptions raised in `__del__` methods and weakref
    callbacks, where a handler may happen to run), so `raise_if_stopped` raises it again."""
    _received.append(signum)
    return Stopped(signum)


def raise_if_stopped() -> None:
    """Raise Stopped if a stop signal arrived (called between batches and jobs)."""
    if _received:
        raise Stopped(_received[0])


def forget_stops() -> None:
    _received.clear()


class StopSweep(BaseException):
    """A job failed in a sweep run with `fail_fast=true`: the remaining jobs are not started."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        super().__init__(str(error))


# OSErrors about the user's disk, not the code: no permission, read-only, full, a file in the way
_DISK_ERRORS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def user_message(error: BaseException) -> str | None:
    """One line for an error the user can fix, None for a bug (which keeps its traceback)."""
    if isinstance(error, PipelineError):
        return str(error)
    if isinstance(error, OSError) and error.errno in _DISK_ERRORS and error.filename:
        return (
            f"cannot write {error.filename} ({error.strerror}); free some disk space or "
            "pass a writable folder as paths.outputs=DIR"
        )
    if isinstance(error, ValueError) and str(error).startswith("Only one of --run, --multirun"):
        return (
            f"{error} (Hydra's command line); e.g. drop -m to print the config with --cfg job, "
            "or drop --cfg to run the sweep"
        )
    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = (error.missing_cfg_file or "").rpartition("/")
        options = sorted(error.options)
        return (
            f"unknown {group or 'config'} '{name}'; valid options: {', '.join(options)} "
            f"(e.g. {group}={options[0]})"
        )
    if isinstance(error, HydraException | OmegaConfBaseException):
        cause = error.__cause__
        detail = f" ({_first_line(cause)})" if cause is not None else ""
        hint = (
            (
                "; check the spelling (`python -m pipeline --cfg job` prints every key) or add a new "
                "key with +key=value"
            )
            if _first_line(error).startswith("Could not override")
            else ""
        )
        return f"{_first_line(error)}{detail}{hint}"
    return None
