"""advex-pipeline: train image classifiers, attack them, track every run in MLflow."""

import pipeline.config  # noqa: F401  (registers the ${project_root:} resolver used by conf/)
from pipeline.models import load_classifier

__all__ = ["load_classifier"]
