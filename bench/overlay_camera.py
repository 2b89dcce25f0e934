"""How well the overlay's camera puts the mesh on the face, on synthetic faces with a known camera.

Renders random faces of the synthetic FLAME-format model exactly as the synthetic data set
does (random pose, perspective camera, ArcFace alignment from the projected keypoints),
so the true position of every vertex in the aligned crop is known. Then places the true
mesh on the crop from its five 3D keypoints and the ArcFace template, as the overlay does:
before, with a general affine camera fitted to the five points; now, with
`ofer.inference.pictures.place_on_crop`. Prints the silhouette IoU, the area of the drawn
silhouette over the true one, and the mean error of the visible vertices in pixels of
the 336-pixel overlay panel.

    python bench/overlay_camera.py --faces 40 [--pictures out_dir]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from ofer.data.synthetic import N_SHAPE, SampleMaker, SyntheticSettings, landmark_box
from ofer.flame import FLAME
from ofer.flame.synthetic import write_synthetic_flame
from ofer.inference.pictures import place_on_crop
from ofer.io import write_image
from ofer.preprocess import ARCFACE_TEMPLATE, five_keypoints, prepare_face, transform_points
from ofer.render import image_grid, rasterize

SCALE = 3  # the overlay's upscaling of the 112-pixel crop


def silhouette(screen: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    return rasterize(screen, faces, size, size)[0] >= 0


def affine_before(vertices: np.ndarray, kpt5: np.ndarray, template: np.ndarray) -> np.ndarray:
    """The overlay's placement before: a least-squares affine camera (2, 4) from the 5 points."""
    camera = np.linalg.lstsq(np.c_[kpt5, np.ones(5)], template, rcond=None)[0].T  # (2, 4)
    forward = np.cross(camera[0, :3], camera[1, :3])
    depth = -vertices @ forward / np.linalg.norm(forward) * np.sqrt(np.prod(np.linalg.norm(camera[:, :3], axis=1)))
    return np.c_[vertices @ camera[:, :3].T + camera[:, 3], depth]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pictures", type=Path, default=None, help="write true/affine/scaled-orthographic outlines here")
    args = p.parse_args()

    paths = write_synthetic_flame(Path(tempfile.mkdtemp()) / "flame")
    flame = FLAME(str(paths.model), n_shape=N_SHAPE, n_exp=50, landmark_embedding_path=str(paths.landmarks))
    settings = SyntheticSettings()
    maker = SampleMaker(flame, settings)
    r, faces, size = maker.renderer, maker.renderer.faces, 112 * SCALE
    rng = np.random.default_rng(args.seed)
    # Pixel (i, j) of the crop becomes the SCALE x SCALE block whose centre is SCALE * (i, j) + (SCALE - 1) / 2.
    template = ARCFACE_TEMPLATE * SCALE + (SCALE - 1) / 2
    results = {"affine (before)": [], "place_on_crop (now)": []}
    for i in range(args.faces):
        shape, albedo = maker.identity(rng)
        exp, jaw = maker.expression(rng)
        verts = r.vertices(shape, exp[:50], jaw)
        yaw, pitch = rng.uniform(-1, 1) * settings.max_yaw, rng.uniform(-1, 1) * settings.max_pitch
        rotation = Rotation.from_euler("yxz", [yaw, pitch, rng.normal(0, 3)], degrees=True).as_matrix()
        photo, screen, lmk = r.photo(verts, rotation, rng, albedo)
        face = prepare_face(photo, five_keypoints(lmk), landmark_box(lmk))
        true_xy = transform_points(face.m112, screen[:, :2]) * SCALE + (SCALE - 1) / 2  # (V, 2)
        face_index = rasterize(np.c_[true_xy, screen[:, 2]], faces, size, size)[0]
        truth = face_index >= 0
        visible = np.unique(faces[np.unique(face_index[truth])])  # vertices of the visible faces
        kpt5 = five_keypoints(r.landmarks68(verts))
        outlines = [truth]
        for name, place in zip(results, (affine_before, place_on_crop)):
            drawn = place(verts * 1000.0, kpt5 * 1000.0, template)
            mask = silhouette(drawn, faces, size)
            outlines.append(mask)
            results[name].append(((mask & truth).sum() / (mask | truth).sum(), mask.sum() / truth.sum(),
                                  np.linalg.norm(drawn[visible, :2] - true_xy[visible], axis=1).mean()))
        if args.pictures is not None and i < 8:
            crop = np.ascontiguousarray(np.repeat(np.repeat(face.crop112, SCALE, 0), SCALE, 1))
            tiles = []
            for mask in outlines:
                tile = crop.copy()
                edge = mask ^ np.roll(mask, 1, 0) | mask ^ np.roll(mask, 1, 1)
                tile[edge] = (0, 255, 0)
                tiles.append(tile)
            write_image(args.pictures / f"face_{i:02d}.png",
                        image_grid(tiles, ncols=3, labels=["true camera", *results]))
    print(f"{args.faces} synthetic faces (yaw <= {settings.max_yaw} deg, pitch <= {settings.max_pitch} deg), "
          f"true mesh placed from its 5 keypoints and the ArcFace template")
    print(f"{'camera':22s} {'IoU mean':>9s} {'IoU min':>8s} {'area/true':>10s} {'vertex px':>10s}")
    for name, rows in results.items():
        iou, area, err = np.array(rows).T
        print(f"{name:22s} {iou.mean():9.3f} {iou.min():8.3f} {area.mean():10.3f} {err.mean():10.2f}")


if __name__ == "__main__":
    main()
