"""Run OFER on a list of preprocessed face images (see README: Inference).

python test.py --cfg CFG --checkpoint1 IDRANK.tar --checkpoint2 IDGEN.tar --checkpoint3 EXPGEN.tar \
    --filename LIST.txt --imagepath DIR --outputpath OUT
"""

import sys

from ofer.inference.cli import main

if __name__ == "__main__":
    sys.exit(main())
