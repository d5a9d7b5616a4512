"""python -m fer_train: the command line (fer_train/cli.py)."""

import sys

from fer_train.cli import main

sys.exit(main())
