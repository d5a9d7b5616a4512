"""python -m fer_train: the command line (fer_train/cli.py)."""

import time

STARTED = time.perf_counter()  # before the heavy imports: a time budget counts the command's start-up too

import sys  # noqa: E402

from fer_train.cli import main  # noqa: E402

if __name__ == "__main__":  # not when a spawned worker process imports this module
    sys.exit(main(started=STARTED))
