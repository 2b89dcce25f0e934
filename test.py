"""Run OFER on a list of preprocessed face images (see README: Inference).

python test.py --cfg CFG --checkpoint1 IDRANK.tar --checkpoint2 IDGEN.tar --checkpoint3 EXPGEN.tar \
    --filename LIST.txt --imagepath DIR --outputpath OUT
"""

import sys

from ofer.entry import run_command

if __name__ == "__main__":
    sys.exit(run_command("ofer.inference.cli"))  # SIGTERM handled as Ctrl-C from here on
