"""python -m fer_train: for now, the installation self-check (fer_train/selfcheck.py)."""

import sys

from fer_train.selfcheck import main

sys.exit(main())
