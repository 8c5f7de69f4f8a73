"""`python -m pipeline <overrides> [-m]`: train (cached) and attack, tracked in MLflow."""

import hydra
from omegaconf import DictConfig

from pipeline.cli import entrypoint, exit_on_user_error, in_multirun
from pipeline.config import CONFIG_DIR, check_devices, validate


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    validate(cfg)
    check_devices(cfg, multirun=in_multirun())
    # the heavy stack (torch, Lightning, MLflow) is imported once the config is known to be good
    from pipeline.run import run

    return run(cfg)["success_rate"]  # a sweeper (e.g. Optuna) can optimise what is returned


if __name__ == "__main__":
    entrypoint(main)
