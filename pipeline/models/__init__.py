"""The classifiers a job trains or loads. `pipeline.models.CNN` is the import path old checkpoints
store, so the networks stay importable from here."""

from pipeline.models.nets import CNN, MLP, Classifier, load_classifier

__all__ = ["CNN", "MLP", "Classifier", "load_classifier"]
