"""`python -m ofer.preprocess` (see ofer.preprocess.cli).

SIGTERM is made an interrupt first thing, before the heavy imports (OpenCV, torch): a stop
during start-up then exits 130, as one during the run does (which also writes the report).
"""

import sys

from ofer.entry import run_command

sys.exit(run_command("ofer.preprocess.cli", prog="python -m ofer.preprocess"))
