"""python -m fer_train: the command line (fer_train/cli.py)."""

import sys

from fer_train.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    sys.exit(main())
