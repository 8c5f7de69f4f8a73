"""The command-line layer around Hydra: user errors become one `error: …` line and exit status 2;
SIGTERM and Ctrl-C end the open runs KILLED; a multirun gets its MLflow parent run from a Hydra
callback, and no parent run is ever left RUNNING.

This module imports no torch, Lightning or MLflow: `--help`, `--cfg job` and config errors answer
before them (the tracking modules are imported once a sweep opens)."""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.errors import (
    PipelineError,
    Stopped,
    StopSweep,
    forget_stops,
    note_stop,
    raise_if_stopped,
    report,
    user_message,
)

T = TypeVar("T")


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (`-m`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_user_error(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Wrap a Hydra task: in a single run a PipelineError ends the process with its one line.

    (Raised normally, Hydra would first print its own "Error executing job" line.) In a
    multirun the error is re-raised, so Hydra records the job as failed and runs the others,
    unless `fail_fast=true`, which stops the sweep at the first failed job.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> T:
        try:
            return task(cfg)
        except Exception as error:
            if in_multirun():
                if cfg.get("fail_fast"):
                    raise StopSweep(error) from error
                raise
            if not isinstance(error, PipelineError):
                raise
            report(str(error))
            raise SystemExit(2) from error

    return wrapper


def _close_sweeps(status: str, error: BaseException | None, job_failed: bool = False) -> None:
    sweep = sys.modules.get("pipeline.tracking.sweep")  # imported by a process that opened a sweep
    if sweep is None:
        return
    try:
        sweep.finish_open_sweeps(status, error, job_failed)
    except Exception as tracking_error:  # the store may be what failed; report the first error
        print(f"warning: could not close the sweep's parent run: {tracking_error}", file=sys.stderr)


class SweepCallback(Callback):
    """Hydra callback (conf/config.yaml): one parent run per multirun, jobs become its children."""

    def __init__(self) -> None:
        self.sweep: Any = None  # the open pipeline.tracking.sweep.Sweep

    def __getstate__(self) -> dict:  # a launcher ships callbacks to its workers: not the open sweep
        return {"sweep": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from pipeline.tracking.sweep import open_sweep

            self.sweep = open_sweep(config)
        except Exception as error:
            # Hydra would turn an exception here into a warning and start every job anyway
            message = user_message(error)
            if message is None:
                traceback.print_exc()
            else:
                report(message)
            raise SystemExit(2 if message else 1) from error

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """Record the job's outcome (COMPLETED, or FAILED and its one line) on the parent run."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        outcome = job_return.status.name
        if outcome == "FAILED":
            error = getattr(job_return, "_return_value", None)
            outcome += f": {user_message(error) or repr(error)}"[:400] if error is not None else ""
        from pipeline.tracking.sweep import record_job

        record_job(config, outcome)
        raise_if_stopped()  # the next job does not start after a stop signal

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep is not None:
            self.sweep.finish_if_open()


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and the first Ctrl-C raise Stopped, so open runs end KILLED; a second signal
    ends the process at once."""

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        raise note_stop(signum)

    forget_stops()
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        raise_if_stopped()  # a stop whose exception was lost still ends the process as a stop
    finally:
        forget_stops()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def entrypoint(hydra_main: Callable[[], object]) -> None:
    """Call a `@hydra.main` function; any parent run still open is closed whatever happens."""
    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach this function, not Hydra's printer
    try:
        with _stop_on_signals():
            hydra_main()
    except (Stopped, KeyboardInterrupt) as stop:
        _close_sweeps("KILLED", stop)
        print(
            f"{stop or 'stopped by Ctrl-C'}: open runs are marked KILLED; type the same command "
            "again to resume a sweep",
            file=sys.stderr,
        )
        sys.exit(128 + getattr(stop, "signum", signal.SIGINT))
    except SystemExit as done:
        _close_sweeps("FAILED" if done.code else "FINISHED", None)
        raise
    except (Exception, StopSweep) as error:
        cause = error.error if isinstance(error, StopSweep) else error
        _close_sweeps("FAILED", cause, job_failed=cause is not error)
        message = user_message(cause)
        if message is None or user_setting == "1":
            raise cause from cause.__cause__
        report(
            message + (" (fail_fast=true: the remaining jobs were not started)" if cause is not error else "")
        )
        sys.exit(2)
    finally:
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting
