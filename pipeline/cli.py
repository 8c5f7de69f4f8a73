"""Command-line wrapper: user errors become one `error: …` line and exit status 2."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import PipelineError, report
from pipeline.tracking import finish_open_sweeps

T = TypeVar("T")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def user_message(error: BaseException) -> str | None:
    """One line for an error the user can fix, None for a bug (which keeps its traceback)."""
    if isinstance(error, PipelineError):
        return str(error)
    if isinstance(error, MissingConfigException) and error.options:
        group, _, name = (error.missing_cfg_file or "").rpartition("/")
        options = sorted(error.options)
        return (f"unknown {group or 'config'} '{name}'; valid options: {', '.join(options)} "
                f"(e.g. {group}={options[0]})")
    if isinstance(error, HydraException | OmegaConfBaseException):
        cause = error.__cause__
        detail = f" ({_first_line(cause)})" if cause is not None else ""
        return f"{_first_line(error)}{detail}"
    return None


def exit_on_user_error(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap a Hydra task: in a single run a PipelineError ends the process with its one line.

    (Raised normally, Hydra would first print its own "Error executing job" line.) In a
    multirun the error is re-raised, so Hydra records the job as failed and runs the others.
    """
    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> T:
        try:
            return task(cfg)
        except PipelineError as error:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            report(str(error))
            raise SystemExit(2) from error

    return wrapper


def entrypoint(hydra_main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function; any parent run still open is closed whatever happens."""
    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach this function, not Hydra's printer
    try:
        hydra_main()
    except KeyboardInterrupt as error:
        finish_open_sweeps("KILLED", error)
        sys.exit(130)
    except Exception as error:
        try:
            finish_open_sweeps("FAILED", error)
        except Exception as tracking_error:  # the store may be what failed; report the first error
            print(f"warning: could not close the sweep's parent run: {tracking_error}",
                  file=sys.stderr)
        message = user_message(error)
        if message is None or user_setting == "1":
            raise
        report(message)
        sys.exit(2)
    finally:
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting
