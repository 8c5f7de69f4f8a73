"""`python -m pipeline.train <overrides>`: make sure the checkpoint for the config exists (the
attack job does the same on its own; this trains without attacking)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline.cli import entrypoint, exit_on_user_error
from pipeline.config import CONFIG_DIR, build, is_pretrained, validate
from pipeline.errors import ConfigError


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    validate(cfg)
    if is_pretrained(cfg):
        raise ConfigError(f"model={cfg.model.name} comes pretrained; there is nothing to train")
    # the heavy stack (torch, Lightning, MLflow) is imported once the config is known to be good
    from pipeline.models.training import checkpoint_for
    from pipeline.tracking.store import Tracker

    data = build(cfg.data.module)
    tracker = Tracker.connect(cfg.tracking)
    tracker.check_writable(f"{cfg.tracking.experiment}-train")
    data.prepare_data()
    checkpoint = checkpoint_for(cfg, data, tracker)
    accuracy = checkpoint.info.get("test_accuracy", float("nan"))
    print(f"checkpoint {checkpoint.path} (test accuracy {accuracy:.4f})")


if __name__ == "__main__":
    entrypoint(main)
