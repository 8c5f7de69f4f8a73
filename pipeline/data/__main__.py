"""`python -m pipeline.data` (`make data`): fetch MNIST into outputs/data/ and verify every file."""

import sys

from pipeline.config import PROJECT_ROOT
from pipeline.data.mnist import ensure_mnist, raw_dir
from pipeline.errors import DataError

if __name__ == "__main__":
    data_root = PROJECT_ROOT / "outputs" / "data"
    try:
        ensure_mnist(data_root)
    except DataError as error:
        sys.exit(f"error: {error}")
    print(f"MNIST verified in {raw_dir(data_root)}")
