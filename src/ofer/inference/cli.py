"""`test.py`: run the OFER pipeline on a list of preprocessed images.

The original flags keep working (`--cfg`, `--checkpoint1` IdRank, `--checkpoint2` IdGen,
`--checkpoint3` ExpGen, `--filename`, `--imagepath`, `--outputpath`, `--numcheckpoint`).
Each list entry names a 224 crop (`<imagepath>/<entry>`, .jpg assumed when no suffix is
given) with its ArcFace array (`.npy`) beside it, as `python -m ofer.preprocess` writes.
Outputs are named as the original names them (SPEC §11): the entry without its suffix and
without an `arcface_input/` folder, so `arcface_input/<stem>.jpg` gives
`shapesample/<stem>_0.ply`; other sub-folders are kept.

Each image is loaded, checked, reconstructed and written under one guard: whatever goes wrong
with it (a bad file, NaN from the networks, an error while writing) fails that image alone,
with the reason in `summary.json`, and the run goes on. Finished images are skipped on a
re-run unless `--overwrite`. Under torchrun the list is split over the ranks
(`ofer.inference.ranks`); the output folder is checked and locked before any work
(`ofer.io.check_output_folder`, `ofer.inference.outfolder`); `summary.json` is written
however the run ends (`ofer.inference.summary`).

Exit codes: 0 every listed image has outputs from this run or an earlier one; 1 some images
failed; 2 bad config, list, assets or output folder (nothing reconstructed); 130 interrupted
(Ctrl-C or SIGTERM; summary.json says what was done).
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import socket
import time
from pathlib import Path

import torch

from ofer.api import (
    SAMPLING_KEYS,
    ImageError,
    checkpoint_records,
    from_config,
    image_failure,
    run_settings,
    sampling_overrides,
)
from ofer.config import Config, ConfigError, load_config
from ofer.diffusion.samplers import SAMPLERS
from ofer.entry import sigterm_interrupts
from ofer.inference.layout import IMAGE_SUFFIXES, MESH_FORMATS, done_marker, output_name
from ofer.inference.outfolder import OutputLock, lock_holder
from ofer.inference.ranks import Ranks
from ofer.inference.summary import RankReport, RunPlan, remove_reports, write_summary
from ofer.io import InputError, OutputFolderError, check_output_folder, list_entries
from ofer.logs import setup_logging
from ofer.progress import progress
from ofer.report import build_report

log = logging.getLogger("ofer.test")
EXIT_OK, EXIT_FAILED, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reconstruct FLAME faces from images with OFER.",
                                epilog="exit codes: 0 all images done, 1 some images failed, "
                                       "2 bad config/list/assets/output folder, 130 interrupted")
    p.add_argument("--cfg", default=None, help="config YAML: FLAME assets, front indices, test.* settings")
    p.add_argument("--checkpoint1", required=True, help="IdRank checkpoint")
    p.add_argument("--checkpoint2", required=True, help="IdGen checkpoint")
    p.add_argument("--checkpoint3", required=True, help="ExpGen checkpoint")
    p.add_argument("--filename", required=True, help="text file listing images, one per line")
    p.add_argument("--imagepath", default=".", help="folder the list entries are relative to")
    p.add_argument("--outputpath", default="output", help="output folder")
    p.add_argument("--numcheckpoint", type=int, default=None,
                   help="the original's number of checkpoints (3 in its test.sh); accepted, never part of file names")
    p.add_argument("--num-shapes", type=int, help="N IdGen samples ranked by IdRank (test.numsamples)")
    p.add_argument("--num-expressions", type=int, help="M ExpGen samples (test.num_expressions)")
    p.add_argument("--sampler", choices=SAMPLERS, help="IdGen sampler (test.sampling)")
    p.add_argument("--steps", type=int, help="IdGen steps for ddim, dpmpp_2m, unipc (test.steps)")
    p.add_argument("--exp-sampler", choices=SAMPLERS, help="ExpGen sampler")
    p.add_argument("--exp-steps", type=int, help="ExpGen steps for ddim, dpmpp_2m, unipc")
    p.add_argument("--seed", type=int, help="random seed (test.seed); an image's samples depend on it and its name only")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="network dtype at inference (test.dtype)")
    p.add_argument("--compile", action="store_const", const="true",
                   help="torch.compile the denoiser call (test.compile): slow first call, then faster")
    p.add_argument("--cuda-graph", action="store_const", const="true",
                   help="on a GPU, replay each denoiser call as a captured CUDA graph (test.cuda_graph)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--batch", type=batch_size, default="auto",
                   help="images reconstructed together: a number, or auto (default: chosen from the device, N, M and "
                        "FLAME's size; ofer.inference.batching); outputs do not depend on it")
    p.add_argument("--overwrite", action="store_true", help="redo images that already have outputs")
    p.add_argument("--no-report", action="store_true",
                   help="do not write the HTML report <outputpath>/report/ (python -m ofer.report OUT writes it later)")
    p.add_argument("--mesh-format", choices=list(MESH_FORMATS), default="ply",
                   help="file format of the meshes: ply (default, as the original), obj, or both")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def batch_size(text: str) -> int | str:
    """--batch: `auto` or a count of at least 1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def read_list(list_file: Path, image_root: Path) -> list[tuple[str, Path]]:
    """(output name, image path) per non-empty, non-comment line (`output_name` gives the name).

    Raises:
        InputError: the list or the image folder is missing, the list is not UTF-8 text or lists
            no image, an entry would write outside the output folder, or two entries would write
            the same output name. Messages name the file and the line.
    """
    if not list_file.is_file():
        raise InputError(f"{list_file}: image list not found")
    if not image_root.is_dir():
        raise InputError(f"--imagepath {image_root}: folder not found (list entries are relative to it)")
    entries: list[tuple[str, Path]] = []
    seen: dict[str, str] = {}
    for number, entry in list_entries(list_file):
        try:
            name = output_name(entry)
        except InputError as err:
            raise InputError(f"{list_file}: line {number}: {err}") from None
        if name in seen:
            raise InputError(f"{list_file}: line {number}: entries '{seen[name]}' and '{entry}' would both write "
                             f"outputs named '{name}'")
        seen[name] = entry
        rel = posixpath.normpath(entry)
        if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
            entries.append((name, image_root / rel))
            continue
        candidates = [image_root / f"{rel}{suffix}" for suffix in IMAGE_SUFFIXES]
        entries.append((name, next((c for c in candidates if c.is_file()), candidates[0])))
    if not entries:
        raise InputError(f"{list_file}: lists no image (only empty lines or # comments)")
    return entries


def main(argv: list[str] | None = None) -> int:
    """Run test.py; the exit code is one of EXIT_* (see the module docstring)."""
    args = parse_args(argv)
    setup_logging(args.log_level)  # ranks > 0 say only what goes wrong
    ranks = Ranks.from_env()
    try:
        with sigterm_interrupts():
            return run(args, ranks)
    except (ConfigError, InputError, OutputFolderError, FileNotFoundError) as err:  # bad setup: say what
        log.error("%s", err)
        return EXIT_SETUP
    except KeyboardInterrupt:
        log.warning("interrupted")
        return EXIT_INTERRUPTED
    finally:
        ranks.close()


def run(args: argparse.Namespace, ranks: Ranks) -> int:
    """Load the settings and the list, take the output folder, reconstruct this rank's share."""
    device = ranks.device(args.device)
    overrides = sampling_overrides({flag: getattr(args, flag) for flag in SAMPLING_KEYS}, args.opt)
    cfg = load_config(args.cfg, overrides)
    if args.numcheckpoint is not None and args.numcheckpoint != 3:
        log.warning("--numcheckpoint %d ignored: test.py always takes the three checkpoints --checkpoint1..3, "
                    "and output names use index 0 as the original's do", args.numcheckpoint)
    out = Path(args.outputpath)
    entries = read_list(Path(args.filename), Path(args.imagepath))
    checkpoints = {"idrank": args.checkpoint1, "idgen": args.checkpoint2, "expgen": args.checkpoint3}
    records = checkpoint_records(checkpoints)
    settings = run_settings(cfg, cfg.test, records)
    lock = OutputLock(out)
    try:
        plan = start_run(out, entries, args.overwrite, lock, ranks)
        return reconstruct_shard(args, cfg, checkpoints, records, out, plan, settings, ranks, device)
    finally:
        if ranks.rank == 0:
            lock.release()


def start_run(out: Path, entries: list[tuple[str, Path]], overwrite: bool, lock: OutputLock,
              ranks: Ranks) -> RunPlan:
    """Check and lock the output folder and decide what to do (rank 0), before any model is loaded.

    Every rank gets the same plan, or the same OutputFolderError.
    """
    plan: RunPlan | str | None = None  # rank 0 decides
    if ranks.rank == 0:
        try:
            check_output_folder(out)
            lock.acquire()
            remove_reports(out)
            finished = [] if overwrite else [n for n, _ in entries if done_marker(out, n).is_file()]
            skip = set(finished)
            plan = RunPlan(run_id=f"{socket.gethostname()}-{os.getpid()}-{time.time():.0f}",
                           listed=[n for n, _ in entries], finished=finished,
                           todo=[(n, p) for n, p in entries if n not in skip], lock_owner=lock.owner)
        except OutputFolderError as err:
            plan = str(err)
    plan = ranks.broadcast(plan)
    if isinstance(plan, str):
        raise OutputFolderError(plan)
    # Every rank writes into the folder rank 0 locked: across nodes it must be shared storage.
    seen = ranks.gather(ranks.rank == 0 or lock_holder(lock.path) == plan.lock_owner)
    if not all(seen):
        raise OutputFolderError(f"output folder {out} is not the same folder on every rank (ranks "
                                f"{[r for r, ok in enumerate(seen) if not ok]} do not see rank 0's lock "
                                "file): put it on storage every node shares")
    return plan


def reconstruct_shard(args: argparse.Namespace, cfg: Config, checkpoints: dict[str, str], records: dict[str, dict],
                      out: Path, plan: RunPlan, settings: dict, ranks: Ranks, device: torch.device) -> int:
    """Reconstruct this rank's share of the plan on `device`, report it, and (rank 0) write the run's summary.json."""
    mine = ranks.shard(plan.todo)
    report = RankReport(ranks.rank, str(device))
    if ranks.rank == 0:
        log.info("%d images listed, %d already done, %d to reconstruct on %d process(es)", len(plan.listed),
                 len(plan.finished), len(plan.todo), ranks.world)
    start = time.perf_counter()
    completed = False
    try:
        model = from_config(cfg, checkpoints["idrank"], checkpoints["idgen"], checkpoints["expgen"], device, records)
        report.load_seconds = time.perf_counter() - start
        batch = model.auto_batch(cfg.test, len(mine)) if args.batch == "auto" else args.batch
        if ranks.rank == 0:
            log.info("%d image(s) per batch%s", batch, " (--batch auto)" if args.batch == "auto" else "")
        desc = "images" if ranks.world == 1 else f"images (rank 0 of {ranks.world})"
        with progress(total=len(mine), desc=desc, unit="img", disable=ranks.rank > 0) as bar:
            for name, result in model.iter_crops(mine, batch, cfg.test):
                if isinstance(result, ImageError):
                    report.failed[name] = result.reason
                else:
                    try:
                        result.save(out, run=plan.run_id, mesh_format=args.mesh_format)
                    except Exception as err:
                        report.failed[name] = image_failure(name, f"outputs of {name} could not be written to {out}",
                                                            err).reason
                bar.update(1)
        completed = True
    except KeyboardInterrupt:
        report.interrupted = True
        log.warning("interrupted: writing %s", out / "summary.json")
    finally:
        report.seconds = time.perf_counter() - start
        report.save(out)
        if not completed:  # interrupted or an error: the others may never reach the barrier
            write_summary(out, plan, settings, ranks.world)
    if report.interrupted:
        return EXIT_INTERRUPTED
    try:
        ranks.barrier()
    except Exception as err:  # another rank died: merge what is there
        log.error("waiting for the other ranks failed (%s); summary.json covers the ranks that reported", err)
        write_summary(out, plan, settings, ranks.world)
        return EXIT_FAILED
    if ranks.rank != 0:
        return EXIT_FAILED if report.failed else EXIT_OK
    summary = write_summary(out, plan, settings, ranks.world)
    remove_reports(out)
    if not args.no_report:
        write_report(out)
    print(f"reconstructed {len(summary['reconstructed'])} images, {len(summary['failed'])} failed, "
          f"{len(summary['skipped_already_done'])} already done, outputs in {out} (summary.json)")
    for note in summary["notes"]:
        print(f"note: {note}")
    return EXIT_FAILED if summary["failed"] or summary["not_processed"] else EXIT_OK


def write_report(out: Path) -> None:
    """The run's HTML report (`ofer.report`); a report that cannot be written is said, the run's outputs stand."""
    try:
        index = build_report(out)
    except OSError as err:
        log.error("the HTML report could not be written to %s (%s); python -m ofer.report %s retries", out, err, out)
        return
    print(f"report: {index}")
