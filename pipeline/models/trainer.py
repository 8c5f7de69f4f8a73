"""Lightning Trainers built from the `trainer` config group, shared by the train and attack steps."""

from __future__ import annotations

import functools
import logging
import os
import warnings

import pytorch_lightning as L
from omegaconf import DictConfig, OmegaConf


@functools.cache
def _quiet_and_deterministic() -> None:
    """Once per process, before the first Trainer: Lightning's start-up banner (GPU/TPU
    availability) and data-loader worker advice are noise here (the data sit in memory as
    tensors, so worker processes would only slow loading down); cuBLAS gets the deterministic
    workspace PyTorch's deterministic mode asks for (no effect on CPU)."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("pytorch_lightning.accelerators.cuda").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")  # inside Lightning
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def lightning_trainer(cfg: DictConfig, **overrides) -> L.Trainer:
    """A Trainer from `cfg.trainer` (device, precision, progress bar, determinism) plus `overrides`."""
    _quiet_and_deterministic()
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer, dict)  # cfg.trainer is a mapping
    options = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        **trainer,
        **overrides,
    }
    return L.Trainer(**options)
