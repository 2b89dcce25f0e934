"""`python -m ofer.preprocess` (see ofer.preprocess.cli)."""

import sys

from ofer.preprocess.cli import main

sys.exit(main())
