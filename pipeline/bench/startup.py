"""`python -m pipeline.bench.startup` (a section of `make bench`): how soon the command line
answers. `--help`, `--cfg job` and a config error (`eps=2`) are answered from the composed config
alone, before torch, Lightning and MLflow are imported; `import pipeline.run` is what a real job
pays for those imports before it reads any data."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from pipeline.config import PROJECT_ROOT

# key (an MLflow metric name) → the python arguments timed
COMMANDS = {
    "help_seconds": ["-m", "pipeline", "--help"],
    "cfg_job_seconds": ["-m", "pipeline", "--cfg", "job"],
    "config_error_seconds": ["-m", "pipeline", "eps=2"],
    "job_imports_seconds": ["-c", "import pipeline.run"],
}


def command(key: str) -> str:
    return "python " + " ".join(COMMANDS[key])


def _seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True)
    return time.perf_counter() - start


def startup_seconds(repeats: int = 3) -> dict[str, float]:
    """Median wall time of each command in a fresh process (after one warm-up run that fills the
    file cache and Python's bytecode cache)."""
    seconds = {}
    for name, args in COMMANDS.items():
        _seconds(args)
        seconds[name] = statistics.median(_seconds(args) for _ in range(repeats))
    return seconds


def main() -> None:
    print("| command | wall time (s) |\n|---|---|")
    for key, seconds in startup_seconds().items():
        print(f"| `{command(key)}` | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
