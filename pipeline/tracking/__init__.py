"""Everything MLflow: the run store, sweep parent runs, figures, saved UI views and the server."""

from pipeline.tracking.store import PARENT_ENV, SWEPT_ENV, Tracker, provenance_tags

__all__ = ["PARENT_ENV", "SWEPT_ENV", "Tracker", "provenance_tags"]
