"""Logging set-up of the command-line tools: one line format, and under torchrun one voice.

Every process of a torchrun job does the same set-up work: it loads the same checkpoints (one
line per stage from `ofer.checkpoints.load_state`), and a training process validates on the
same batches. Rank 0 says all that once; ranks > 0 log only warnings and errors (what may
differ between them, e.g. a bad training sample), each line naming its rank.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = "INFO", rank: int | None = None) -> None:
    """`logging.basicConfig` for this process: `level` on rank 0, at least WARNING on the others.

    `rank` defaults to torchrun's RANK (0 without torchrun). Like basicConfig, this does nothing
    when the root logger already has a handler (e.g. a calling script configured logging).
    """
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank == 0:
        logging.basicConfig(level=level, format=FORMAT)
        return
    number = logging.getLevelNamesMapping()[level.upper()] if isinstance(level, str) else level
    logging.basicConfig(level=max(number, logging.WARNING), format=FORMAT.replace("%(name)s", f"rank {rank} %(name)s"))
