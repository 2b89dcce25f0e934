"""The README's main command: OFER end to end on a fresh machine, no licensed assets needed.

`python demo.py` (about a minute on 2 CPU cores):
1. Makes the synthetic FLAME-format model and the 12 held-out synthetic test images (with
   and without occluders) with their ground truth under data/synthetic/ (deterministic).
2. Runs test.py with the bundled demo models (models/demo/, trained by `--train` below).
3. Prints the errors against the synthetic ground truth, where the meshes and pictures are,
   and the test.py command it ran.

`python demo.py --train` makes the whole synthetic training set and trains the three demo
stages with configs/demo/*.yml into checkpoint/demo/ (resuming or skipping what is already
trained), then does the same with those checkpoints.

`python demo.py --photos DIR` crops the faces in your photos (`python -m ofer.preprocess`)
and reconstructs them with the demo models. They were trained on synthetic faces only, so
their meshes of real people are not meaningful: this shows the path from photo to mesh.

Everything here is a synthetic stand-in: the numbers say the code works, not how OFER
performs on real faces (for that, see the README's NoW evaluation).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from ofer.config import load_config
from ofer.data.synthetic import GENERATOR_VERSION, SyntheticSettings, generate, generator_version, has_training_data
from ofer.eval.synthetic_table import format_table, synthetic_table
from ofer.inference.cli import main as run_test
from ofer.train.cli import main as train

log = logging.getLogger("demo")
DATA = Path("data/synthetic")
BUNDLED = Path("models/demo")  # inference-only copies of the demo checkpoints (README: how they were made)
TRAINED = Path("checkpoint/demo")
TEST_CFG = "configs/demo/test.yml"
STAGES = (("idgen", "configs/demo/idgen.yml"), ("expgen", "configs/demo/expgen.yml"), ("idrank", "configs/demo/idrank.yml"))
SYNTHETIC_FACES_NOTE = (
    "The demo models were trained on synthetic faces only (a procedural head, not a real face model): "
    "their meshes of real people are not meaningful. Use the released OFER checkpoints for real photos "
    "(README: 'Using OFER with the released weights')."
)


def checkpoints(trained: bool) -> dict[str, Path]:
    """IdRank, IdGen, ExpGen files: the bundled models or the ones `--train` wrote."""
    if trained:
        return {stage: TRAINED / stage / "last.tar" for stage, _ in STAGES}
    return {stage: BUNDLED / f"{stage}.tar" for stage, _ in STAGES}


def make_data(with_training: bool, actors: int) -> bool:
    """The synthetic model and test set, and the training set when asked; False if the folder is outdated."""
    version = generator_version(DATA)
    if version is not None and version != GENERATOR_VERSION:
        log.error("%s was made by an older synthetic-data generator (version %s, now %s): delete %s "
                  "(and checkpoint/demo, whose models were trained on it) and run demo.py again",
                  DATA, version, GENERATOR_VERSION, DATA)
        return False
    if with_training and not has_training_data(DATA):
        generate(DATA, SyntheticSettings(actors=actors))
    elif version is None:
        generate(DATA, SyntheticSettings(), training=False)
    return True


def test_command(ckpt: dict[str, Path], list_file: Path, images: Path, out: Path) -> list[str]:
    """test.py's arguments for the demo models on a list of crops."""
    return [
        "--cfg", TEST_CFG,
        "--checkpoint1", str(ckpt["idrank"]),
        "--checkpoint2", str(ckpt["idgen"]),
        "--checkpoint3", str(ckpt["expgen"]),
        "--filename", str(list_file),
        "--imagepath", str(images),
        "--outputpath", str(out),
        "--device", "cpu",
        "--overwrite",
    ]


def run_and_show(args: list[str]) -> int:
    """Run test.py in this process and print the command a user would type for it."""
    code = run_test(args)
    print(f"\ntest.py command (run it yourself with other settings, e.g. --num-shapes 100):\n  python test.py {shlex.join(args)}")
    return code


def where(out: Path) -> None:
    print(f"\nMeshes: {out}/shapesample/<name>_0.ply (IdRank's pick, neutral), {out}/flamesample/<name>_0_<k>.ply "
          f"(expression samples); all samples and scores in {out}/<name>.npz")
    print(f"Pictures: {out}/<name>/overlay.png (mesh on the face), {out}/<name>/samples.png (expression samples), "
          f"{out}/<name>/shape_spread.png and expression_spread.png (where the samples disagree, mm)")
    print(f"Report: {out / 'report' / 'index.html'} (open it in a browser: every image, its samples in 3D, "
          "coloured by their spread)")


def photos(folder: Path, keypoints: Path | None, ckpt: dict[str, Path], out: Path) -> int:
    """Crop the faces in `folder` with `python -m ofer.preprocess`, then reconstruct them."""
    crops = out / "crops"
    command = [sys.executable, "-m", "ofer.preprocess", "--input", str(folder), "--out", str(crops)]
    if keypoints is not None:
        command += ["--keypoints", str(keypoints)]
    print(f"preprocess command:\n  {shlex.join(['python', *command[1:]])}")
    code = subprocess.run(command).returncode  # 1: some photos failed, the others are cropped
    if code not in (0, 1):  # it could not start: its one error line (above) says why
        log.error("preprocessing %s stopped before any photo (see its error above)", folder)
        return 2
    listed = crops / "list.txt"
    if not listed.is_file() or not listed.read_text().split():
        log.error("no face was cropped from %s; see %s (give --keypoints FILE to place the faces by hand)",
                  folder, crops / "preprocess_report.json")
        return 1
    code = run_and_show(test_command(ckpt, crops / "list.txt", crops, out))
    if code in (0, 1):  # 1: some images failed, summary.json says which
        where(out)
        print(f"\n{SYNTHETIC_FACES_NOTE}")
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="make the training set and train the three demo stages first")
    p.add_argument("--photos", type=Path, help="reconstruct the faces in this folder of photos instead")
    p.add_argument("--keypoints", type=Path, help="with --photos: 5 keypoints per photo (see python -m ofer.preprocess)")
    p.add_argument("--actors", type=int, help=f"with --train: synthetic training identities "
                                               f"(default {SyntheticSettings.actors})")
    p.add_argument("--opt", action="append", default=[], help="with --train: override for every training config (e.g. train.max_steps=100)")
    args = p.parse_args(argv)
    if (args.actors is not None or args.opt) and not args.train:
        p.error("--actors and --opt apply with --train only")
    if args.keypoints is not None and args.photos is None:
        p.error("--keypoints applies with --photos only")
    if args.actors is not None and args.actors < 1:
        p.error(f"--actors {args.actors}: must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    ckpt = checkpoints(args.train)
    if not make_data(args.train, args.actors or SyntheticSettings.actors):  # the demo models need the synthetic FLAME-format model
        return 2
    if args.train:
        for stage, cfg in STAGES:
            train(stage, ["--cfg", cfg, "--resume", *(arg for o in args.opt for arg in ("--opt", o))])
        print(f"Training logs: tensorboard --logdir {TRAINED}")
    if args.photos is not None:
        code = photos(args.photos, args.keypoints, ckpt, Path("output/demo_photos"))
    else:
        out = Path("output/demo_trained" if args.train else "output/demo")
        code = run_and_show(test_command(ckpt, DATA / "test" / "list.txt", DATA / "test", out))
        if code == 0:
            print(f"\nModels: {', '.join(str(p) for p in ckpt.values())}\n")
            cfg = load_config(TEST_CFG)
            print(format_table(synthetic_table(out, DATA, cfg.model.jaw_scale, cfg.test.jaw_limits)))
        where(out)
    print(f"Demo finished in {time.perf_counter() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
