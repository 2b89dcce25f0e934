"""Seconds per image for the two pictures test.py writes (overlay.png + samples.png), before and now.

Both pictures of one image: the overlay (the 112 ArcFace crop drawn 3x larger, 336 px, with
the best shape over it) and the contact sheet (neutral + 11 expression samples at 160 px,
the most test.py draws). Meshes: the synthetic FLAME-format model (2434 vertices, 4864
faces) and a FLAME-sized version of it (part of its faces split in four: about 5023
vertices and 9976 faces, as FLAME). "before" is the code of another git revision
(default: the commit this branch started from), unpacked to a temporary folder; both run
in fresh worker processes, interleaved, and the best of `--repeats` runs is printed.

    python bench/pictures_speed.py [--before 9e6d09a] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLAME_FACES = 9976  # FLAME 2020


def meshes(tmp: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """name -> (neutral (V, 3) mm, expressions (11, V, 3) mm, faces (F, 3), kpt68 (68, 3) mm)."""
    import torch
    import trimesh

    from ofer.flame import FLAME
    from ofer.flame.synthetic import write_synthetic_flame

    paths = write_synthetic_flame(tmp / "flame")
    flame = FLAME(str(paths.model), n_shape=300, n_exp=50, landmark_embedding_path=str(paths.landmarks))
    generator = torch.Generator().manual_seed(0)
    shape = torch.randn(1, 300, generator=generator)
    with torch.no_grad():
        neutral = flame(shape)
        kpt68 = flame.landmarks68(neutral)[0].numpy() * 1000.0
        exp = flame(shape.repeat(11, 1), expression=torch.randn(11, 50, generator=generator),
                    jaw=0.1 * torch.rand(11, 3, generator=generator)).numpy() * 1000.0
    neutral, faces = neutral[0].numpy() * 1000.0, flame.faces.numpy()
    # Split the first k faces in four (3 more faces each) until the mesh has FLAME's face count.
    split = np.arange((FLAME_FACES - len(faces)) // 3)
    big = [trimesh.remesh.subdivide(v, faces, face_index=split) for v in (neutral, *exp)]
    return {
        f"synthetic ({len(neutral)} v, {len(faces)} f)": (neutral, exp, faces, kpt68),
        f"FLAME size ({len(big[0][0])} v, {len(big[0][1])} f)": (
            big[0][0], np.stack([v for v, _ in big[1:]]), big[0][1], kpt68),
    }


def worker(out: Path) -> None:
    """Time both pictures of one image per mesh (after one warm-up); write {name: [wall, cpu] seconds}."""
    try:
        from ofer.inference.pictures import overlay_picture, samples_sheet
    except ImportError:  # the code before the pictures module existed
        from ofer.inference.export import overlay_picture, samples_sheet
    from ofer.inference.pipeline import Reconstruction

    rng = np.random.default_rng(0)
    arcface = np.clip(rng.normal(0, 0.5, (3, 112, 112)), -1, 1).astype(np.float32)
    times = {}
    for name, (neutral, exp, faces, kpt68) in meshes(Path(tempfile.mkdtemp())).items():
        fields = {"shapes": np.zeros((1, 300)), "scores": np.zeros(1), "best": 0, "expressions": np.zeros((11, 50)),
                  "jaws": np.zeros((11, 3)), "neutral_mm": neutral, "expression_mm": exp, "kpt68_mm": kpt68,
                  "kpt7_mm": kpt68[:7], "shape_spread_mm": np.zeros(len(neutral)),
                  "expression_spread_mm": np.zeros(len(neutral))}
        rec = Reconstruction(**{f.name: fields[f.name] for f in dataclasses.fields(Reconstruction)})  # either revision's
        for _ in range(2):  # warm-up, then timed
            wall, cpu = time.perf_counter(), time.process_time()
            overlay_picture(arcface, rec, faces)
            samples_sheet(rec, faces, 11)
            times[name] = [time.perf_counter() - wall, time.process_time() - cpu]
    out.write_text(json.dumps(times))


def run_worker(src: Path, result: Path) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, __file__, "--worker", str(result)], env=env, check=True)
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="9e6d09a", help="git revision of the code to compare against")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "src"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(tmp / "before", filter="data")
    sources = {f"before ({args.before})": tmp / "before" / "src", "now": REPO / "src"}
    best: dict[str, dict[str, np.ndarray]] = {label: {} for label in sources}
    for r in range(args.repeats):
        for label, src in sources.items():
            for name, seconds in run_worker(src, tmp / f"{r}.json").items():
                best[label][name] = np.minimum(best[label].get(name, np.inf), seconds)
    print(f"overlay (336 px) + contact sheet (12 tiles of 160 px) per image, best of {args.repeats}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; wall seconds (CPU seconds of the process)")
    print(f"{'mesh':34s}" + "".join(f"{label:>22s}" for label in sources) + f"{'speed-up':>16s}")
    for name in best["now"]:
        (wall0, cpu0), (wall1, cpu1) = (best[label][name] for label in sources)
        print(f"{name:34s}{wall0:11.3f} ({cpu0:.3f}){wall1:14.3f} ({cpu1:.3f}){wall0 / wall1:7.1f}x ({cpu0 / cpu1:.1f}x)")


if __name__ == "__main__":
    main()
