"""advex-pipeline: train image classifiers, attack them, track every run in MLflow."""

from typing import Any

import pipeline.config  # noqa: F401  (registers the ${project_root:} resolver used by conf/)

__all__ = ["load_classifier"]


def __getattr__(name: str) -> Any:
    # `from pipeline import load_classifier` works without making every `python -m pipeline...`
    # import torch and Lightning before its config is checked
    if name == "load_classifier":
        from pipeline.models import load_classifier

        return load_classifier
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
