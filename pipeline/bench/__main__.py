"""`python -m pipeline.bench attacks=[fgsm] n=2000 batch_size=250 device=cpu` (see conf/bench.yaml)."""

import hydra
from omegaconf import DictConfig

from pipeline.bench.harness import run_bench
from pipeline.cli import entrypoint, exit_on_user_error
from pipeline.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run_bench(cfg)


if __name__ == "__main__":
    entrypoint(main)
