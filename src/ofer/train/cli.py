"""Command line shared by trainIdGen.py, trainExpGen.py and trainIdRank.py."""

from __future__ import annotations

import argparse
import logging
import sys

from ofer.config import ConfigError, load_config
from ofer.io import InputError, WriteError
from ofer.train.trainer import Trainer


def main(stage: str, argv: list[str] | None = None) -> None:
    """Parse `--cfg`, `--opt`, `--resume`/`--overwrite`, then train the given stage."""
    parser = argparse.ArgumentParser(description=f"Train OFER's {stage} stage from a YAML config.")
    parser.add_argument("--cfg", required=True, help="stage config (YAML), e.g. configs/demo/idgen.yml")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --opt train.diff_lr=1e-4 (repeatable)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in train.output_dir from its last.tar (a fresh run when the folder "
                            "has no checkpoints yet)")
    start.add_argument("--overwrite", action="store_true",
                       help="start a new run in a train.output_dir that holds an earlier run's last.tar/best.tar, "
                            "removing them (without this or --resume such a folder is refused)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ofer.train")
    try:
        cfg = load_config(args.cfg, args.opt)
        if cfg.stage != stage:
            parser.error(f"{args.cfg} is a '{cfg.stage}' config, but this script trains '{stage}'")
        path = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    except (ConfigError, InputError, FileNotFoundError) as err:  # bad config, data or assets: say which
        log.error("%s", err)
        sys.exit(2)
    except WriteError as err:  # e.g. disk full during a checkpoint write: which file, and that the old one is kept
        log.error("%s", err)
        sys.exit(1)
    log.info("finished; last checkpoint: %s", path)
