"""CPU seconds and bytes per image that the spread maps, their pictures and the HTML report add.

Per image: the two spreads (`vertex_spread` of the N neutral and the M expressive meshes, on
the CPU here; on a GPU they run there, beside the sampling), `write_uncertainty` (uncertainty.npz,
two vertex-coloured PLYs, two spread pictures and the score plot) and its share of
`build_report` over an output folder of `--images` images written by test.py's own
`write_outputs`. Two sizes: the demo (the synthetic FLAME-format model, 2434 vertices, N = 32,
M = 16, 8 expressions saved: configs/demo/test.yml) and FLAME (part of its faces split until
FLAME's 9976 faces, 5055 vertices; N = M = 100, 15 expressions saved: the original's settings). CPU
seconds are the process's (time.process_time), best of `--repeats`; bytes are the files each
image gets from this change (the report's shared assets, written once per run, are listed apart).

    python bench/report_speed.py [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

from ofer.flame import FLAME
from ofer.flame.synthetic import write_synthetic_flame
from ofer.inference.export import write_outputs
from ofer.inference.layout import UNCERTAINTY_FILES
from ofer.inference.pipeline import Reconstruction
from ofer.inference.uncertainty import vertex_spread, write_uncertainty
from ofer.report import ASSETS, build_report

FLAME_FACES = 9976  # FLAME 2020
SIZES = {"demo": (False, 32, 16, 8), "FLAME": (True, 100, 100, 15)}  # label -> (FLAME-sized, N, M, saved)


def sample_meshes(flame: FLAME, n: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """N neutral meshes (N, V, 3) of random identities and M expressions (M, V, 3) of the first, in mm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shapes = torch.randn(n, 300, generator=generator)
        neutral = flame(shapes).numpy() * 1000.0
        expressive = flame(shapes[:1].repeat(m, 1), expression=torch.randn(m, 50, generator=generator),
                           jaw=0.1 * torch.rand(m, 3, generator=generator)).numpy() * 1000.0
    return neutral, expressive


def flame_sized(meshes: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The meshes (S, V, 3) with part of their faces split in four until they have FLAME's face count."""
    split = np.arange((FLAME_FACES - len(faces)) // 3)
    big = [trimesh.remesh.subdivide(v, faces, face_index=split) for v in meshes]
    return np.stack([v for v, _ in big]), big[0][1]


def reconstruction(neutral: np.ndarray, expressive: np.ndarray, kpt68: np.ndarray, seed: int) -> Reconstruction:
    """A Reconstruction as the pipeline returns it, without the spreads (timed separately)."""
    rng = np.random.default_rng(seed)
    n, m = len(neutral), len(expressive)
    return Reconstruction(shapes=rng.normal(size=(n, 300)), scores=rng.random(n), best=0,
                          expressions=rng.normal(size=(m, 50)), jaws=rng.normal(size=(m, 3)), neutral_mm=neutral[0],
                          expression_mm=expressive, kpt68_mm=kpt68, kpt7_mm=kpt68[:7],
                          shape_spread_mm=np.zeros(0), expression_spread_mm=np.zeros(0))


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def measure(flame: FLAME, big: bool, n: int, m: int, saved: int, images: int, tmp: Path) -> dict[str, float]:
    """CPU seconds per image of each part, and bytes per image, for one size."""
    faces = flame.faces.numpy()
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    arcface = np.clip(np.random.default_rng(0).normal(0, 0.5, (3, 112, 112)), -1, 1).astype(np.float32)
    with torch.no_grad():
        kpt68 = flame.landmarks68(flame(torch.zeros(1, 300)))[0].numpy() * 1000.0
    spread_s = uncertainty_s = 0.0
    for i in range(images):
        neutral, expressive = sample_meshes(flame, n, m, seed=i)
        image_faces = faces
        if big:
            both, image_faces = flame_sized(np.concatenate([neutral, expressive]), faces)
            neutral, expressive = both[:n], both[n:]
        rec = reconstruction(neutral, expressive, kpt68, seed=i)
        start = time.process_time()
        rec.shape_spread_mm = vertex_spread(torch.from_numpy(neutral).float()).numpy()
        rec.expression_spread_mm = vertex_spread(torch.from_numpy(expressive).float()).numpy()
        spread_s += time.process_time() - start
        name = f"image_{i:02d}"
        write_outputs(out, name, rec, image_faces, arcface, saved)
        start = time.process_time()
        write_uncertainty(out / name, rec, image_faces)
        uncertainty_s += time.process_time() - start
    start = time.process_time()
    report = build_report(out).parent
    report_s = time.process_time() - start
    added = folder_bytes([out / f"image_{i:02d}" / f for i in range(images) for f in UNCERTAINTY_FILES])
    pages = folder_bytes([p for p in (report / "images").rglob("*")])
    shared = folder_bytes([report / "index.html", report / "assets" / "run_data.js",
                           *[report / "assets" / a for a in ASSETS]])
    return {"spreads": spread_s / images, "uncertainty files": uncertainty_s / images, "report": report_s / images,
            "bytes: uncertainty files": added / images, "bytes: report pages": pages / images,
            "bytes: report shared": shared}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    try:
        paths = write_synthetic_flame(tmp / "flame")
        flame = FLAME(str(paths.model), n_shape=300, n_exp=50, landmark_embedding_path=str(paths.landmarks))
        results = {}
        for label, (big, n, m, saved) in SIZES.items():
            runs = [measure(flame, big, n, m, saved, args.images, tmp) for _ in range(args.repeats)]
            results[label] = {k: min(r[k] for r in runs) for k in runs[0]}
            results[label]["setting"] = f"N = {n}, M = {m}, {saved} saved"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.images} images, best of {args.repeats}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}\n")
    print("| per image | " + " | ".join(f"{k} ({r['setting']})" for k, r in results.items()) + " |")
    print("|---" * (len(results) + 1) + "|")
    for key in ("spreads", "uncertainty files", "report"):
        print(f"| CPU s: {key} | " + " | ".join(f"{r[key]:.3f}" for r in results.values()) + " |")
    print("| CPU s: total | " + " | ".join(f"{r['spreads'] + r['uncertainty files'] + r['report']:.3f}"
                                         for r in results.values()) + " |")
    for key in ("bytes: uncertainty files", "bytes: report pages"):
        print(f"| {key} | " + " | ".join(f"{r[key] / 1e6:.3f} MB" for r in results.values()) + " |")
    print("| bytes: total per image | " + " | ".join(
        f"{(r['bytes: uncertainty files'] + r['bytes: report pages']) / 1e6:.3f} MB" for r in results.values()) + " |")
    print("| bytes: report assets and index, once per run | " + " | ".join(
        f"{r['bytes: report shared'] / 1e6:.3f} MB" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
