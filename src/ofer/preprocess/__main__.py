"""`python -m ofer.preprocess` (see ofer.preprocess.cli).

SIGTERM is made an interrupt first thing, before the heavy imports (OpenCV, torch): a stop
during start-up then exits 130, as one during the run does (which also writes the report).
"""

import sys

from ofer.preprocess.interrupts import EXIT_INTERRUPTED, sigterm_interrupts

with sigterm_interrupts():
    try:
        from ofer.preprocess.cli import main

        status = main()
    except KeyboardInterrupt:  # before main() could take over: nothing was done
        sys.stderr.write("ERROR ofer.preprocess: interrupted while starting; nothing was done\n")
        status = EXIT_INTERRUPTED
sys.exit(status)
