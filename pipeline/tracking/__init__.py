"""Everything MLflow: the run store (`store.Tracker`), sweep parent runs, figures, saved UI
views and the server. Nothing is imported here, so `python -m pipeline.tracking.ui` and
`python -m pipeline.tracking.server` start without loading the rest."""
