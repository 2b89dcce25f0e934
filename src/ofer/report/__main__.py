"""`python -m ofer.report OUT`: (re)build the HTML report of a test.py output folder into OUT/report/.

Works on any output folder, also one made before the report existed; exit 0 with the path of
index.html, 2 when OUT is not a folder or cannot be written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ofer.report import build_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ofer.report", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="test.py's output folder (--outputpath)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if not args.out.is_dir():
        print(f"error: {args.out}: not a folder (give test.py's --outputpath)", file=sys.stderr)
        return 2
    try:
        index = build_report(args.out)
    except OSError as err:
        print(f"error: the report could not be written into {args.out}: {err}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
