"""Lightning Trainers built from the `trainer` config group, shared by the train and attack steps."""

from __future__ import annotations

import logging
import os
import warnings

import pytorch_lightning as L
from omegaconf import DictConfig, OmegaConf

# Lightning's start-up banner (GPU/TPU availability) and data-loader worker advice are noise here:
# the data sit in memory as tensors, so worker processes would only slow loading down.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
# deterministic cuBLAS on GPU (PyTorch's deterministic mode asks for it; no effect on CPU)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # inside Lightning


def lightning_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    """A Trainer from `cfg.trainer` (device, precision, progress bar, determinism) plus `overrides`."""
    options = {"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
               **OmegaConf.to_container(cfg.trainer, resolve=True), **overrides}
    return L.Trainer(**options)
