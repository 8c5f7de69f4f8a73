"""`python -m pipeline <overrides> [-m]`: train (cached) and attack, tracked in MLflow."""

import hydra
from omegaconf import DictConfig

from pipeline.cli import entrypoint, exit_on_user_error
from pipeline.config import CONFIG_DIR
from pipeline.run import run


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return run(cfg)["success_rate"]  # a sweeper (e.g. Optuna) can optimise what is returned


if __name__ == "__main__":
    entrypoint(main)
