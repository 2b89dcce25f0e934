"""Command line shared by trainIdGen.py, trainExpGen.py and trainIdRank.py.

Exit codes: 0 trained to train.max_steps; 1 a checkpoint or config.yaml could not be written; 2 bad config,
data, assets or output folder; 130 interrupted (Ctrl-C, or SIGTERM: the scripts start through
`ofer.entry.run_command`), after one line saying which checkpoint --resume continues from.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ofer.config import ConfigError, load_config
from ofer.entry import EXIT_INTERRUPTED
from ofer.io import InputError, WriteError
from ofer.logs import setup_logging
from ofer.train.trainer import Trainer

log = logging.getLogger("ofer.train")


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
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="under torchrun, ranks > 0 log warnings and errors only")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    trainer = None
    try:
        cfg = load_config(args.cfg, args.opt)
        if cfg.stage != stage:
            parser.error(f"{args.cfg} is a '{cfg.stage}' config, but this script trains '{stage}'")
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        path = trainer.fit()
    except KeyboardInterrupt:
        if trainer is None or trainer.place.is_main:  # rank 0 speaks for all
            log.warning("%s", interrupted(trainer))
        sys.exit(EXIT_INTERRUPTED)
    except (ConfigError, InputError, FileNotFoundError) as err:  # bad config, data or assets: say which
        log.error("%s", err)
        sys.exit(2)
    except WriteError as err:  # e.g. disk full during a checkpoint write: which file, and that the old one is kept
        log.error("%s", err)
        sys.exit(1)
    log.info("finished; last checkpoint: %s", path)


def interrupted(trainer: Trainer | None) -> str:
    """The line for a run stopped by Ctrl-C or SIGTERM: how far it got, what --resume continues from."""
    if trainer is None:
        return "interrupted while starting, before the first training step; no checkpoint was written"
    steps = f"interrupted after {trainer.step} of {trainer.cfg.train.max_steps} steps"
    if trainer.saved_step is None:
        return (f"{steps}; no checkpoint was written yet (every train.checkpoint_steps = "
                f"{trainer.cfg.train.checkpoint_steps} steps), so --resume would start from scratch")
    return f"{steps}; the last checkpoint is {trainer.out / 'last.tar'} (step {trainer.saved_step}): --resume continues from it"
