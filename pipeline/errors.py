"""User-facing errors: each carries one line saying what is wrong and how to fix it.

`python -m pipeline` prints `error: <message>` for these and exits with status 2;
anything else is a bug and keeps its traceback.
"""

import sys


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
    """The MLflow tracking store cannot be reached or written."""
