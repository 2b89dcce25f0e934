"""A seeded SYNTHETIC model in FLAME's file formats, for tests and the CPU demo.

The real FLAME files cannot ship with this project, so tests and the demo use this stand-in:
a small closed head-like mesh (a deformed sphere with a neck, nose, brows, eye sockets, lips
and chin, ~2.4k vertices) with random smooth identity bases, localised expression bases, a
5-joint skeleton (global, neck, jaw, left eye, right eye), skinning weights, pose correctives,
a landmark embedding and front-face indices. It is written in the same formats and key names
as the real assets (``generic_model.pkl`` with chumpy-style arrays and a ``scipy.sparse.csc``
joint regressor, ``landmark_embedding.npy`` holding torch tensors), so the real loading path
is exercised. It is not a model of human faces and must never be presented as one.

Command line: ``python -m ofer.flame.synthetic --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from ofer.flame.flame import MAX_CONTOUR_YAW, front_face_indices

logger = logging.getLogger(__name__)

N_LAT, N_LON = 38, 64  # latitude rows (without the poles) x longitude columns of the sphere grid
GRID_FOCUS = 0.6  # angular spacing at the face relative to the mean spacing (denser in front)
NOSE_TIP_Z = 0.065  # metres, as in FLAME
MOUTH_LAT = -20.0  # degrees; the mouth line is put between the two grid rows around it
EYE_CENTRES = {"left_eye": (22.0, 12.0), "right_eye": (-22.0, 12.0)}  # (lon, lat) degrees; left = +x


def _smoothstep(x: np.ndarray, edge0: float, edge1: float) -> np.ndarray:
    """0 at edge0, 1 at edge1 (either order), C1 in between, exactly 0/1 outside."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass(frozen=True)
class SyntheticFlamePaths:
    """Files written by :func:`write_synthetic_flame`."""

    model: Path
    landmarks: Path
    front_indices: Path


class _SphereGrid:
    """Latitude/longitude sphere grid: vertex directions, outward faces, point location.

    Vertex (row i, column j) has index i·N_LON + j; rows run from bottom to top, columns by
    longitude from -180°. The bottom and top poles come last. Longitude 0 faces +z (the
    face), +90° faces +x (the subject's left); latitude +90° is +y.
    """

    def __init__(self) -> None:
        u = np.linspace(-1.0, 1.0, N_LAT + 2)[1:-1]
        w = np.linspace(-1.0, 1.0, N_LON + 1)[:-1]
        # a cubic warp puts more rows and columns on the face than at the poles and the back
        self.lat = 90.0 * (GRID_FOCUS * u + (1 - GRID_FOCUS) * u**3)  # (N_LAT,) degrees, increasing
        self.lon = 180.0 * (GRID_FOCUS * w + (1 - GRID_FOCUS) * w**3)  # (N_LON,) degrees, from -180
        lon, lat = np.meshgrid(self.lon, self.lat)  # (N_LAT, N_LON)
        self.vertex_lon = np.concatenate([lon.ravel(), [0.0, 0.0]])  # (V,)
        self.vertex_lat = np.concatenate([lat.ravel(), [-90.0, 90.0]])
        self.directions = self.direction(self.vertex_lon, self.vertex_lat)  # (V,3)
        self.faces = self._faces()

    @staticmethod
    def direction(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Unit vectors (...,3) for longitude/latitude in degrees."""
        lon, lat = np.deg2rad(lon), np.deg2rad(lat)
        return np.stack([np.sin(lon) * np.cos(lat), np.sin(lat), np.cos(lon) * np.cos(lat)], axis=-1)

    def _faces(self) -> np.ndarray:
        """(F,3) triangles wound counter-clockwise seen from outside."""
        rows = np.arange(N_LAT * N_LON).reshape(N_LAT, N_LON)
        a, b = rows[:-1], np.roll(rows, -1, axis=1)[:-1]  # (N_LAT-1, N_LON) quad corners
        c, d = np.roll(rows, -1, axis=1)[1:], rows[1:]
        quads = np.stack([np.stack([a, b, c], -1), np.stack([a, c, d], -1)], axis=2)  # (N_LAT-1, N_LON, 2, 3)
        bottom, top = N_LAT * N_LON, N_LAT * N_LON + 1
        bottom_fan = np.stack([np.full(N_LON, bottom), np.roll(rows[0], -1), rows[0]], axis=1)
        top_fan = np.stack([rows[-1], np.roll(rows[-1], -1), np.full(N_LON, top)], axis=1)
        return np.concatenate([quads.reshape(-1, 3), bottom_fan, top_fan]).astype(np.int64)

    def locate(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Face index (...) and barycentric coordinates (...,3) of surface points given by angle.

        Uses the quad split of :meth:`_faces`: in a cell with local coordinates (s, t) in
        [0,1]^2 (s along longitude, t along latitude), triangle (a,b,c) covers s >= t.
        """
        lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
        row = np.searchsorted(self.lat, lat, side="right") - 1
        if np.any(row < 0) or np.any(row >= N_LAT - 1):
            raise ValueError("synthetic landmark outside the latitude rows of the grid")
        col = np.searchsorted(self.lon, lon, side="right") - 1
        lon_next = np.append(self.lon, self.lon[0] + 360.0)
        s = (lon - self.lon[col]) / (lon_next[col + 1] - self.lon[col])
        t = (lat - self.lat[row]) / (self.lat[row + 1] - self.lat[row])
        upper = s >= t
        face = 2 * (row * N_LON + col) + np.where(upper, 0, 1)
        bary = np.where(
            upper[..., None],
            np.stack([1 - s, s - t, t], axis=-1),  # corners a, b, c
            np.stack([1 - t, s, t - s], axis=-1),  # corners a, c, d
        )
        return face.astype(np.int64), bary


def _bump(grid: _SphereGrid, lon: float, lat: float, width_lon: float, width_lat: float) -> np.ndarray:
    """Gaussian bump (V,) on the grid angles (degrees), 1 at its centre."""
    dlon = (grid.vertex_lon - lon + 180.0) % 360.0 - 180.0
    return np.exp(-((dlon / width_lon) ** 2) - ((grid.vertex_lat - lat) / width_lat) ** 2)


def _head_radius(grid: _SphereGrid, mouth_lat: float) -> np.ndarray:
    """Distance (V,) from the head centre to the surface along each grid direction, metres.

    A star-shaped surface (one radius per direction) is closed and free of self-intersections
    by construction: an ellipsoid skull (flatter at the face), joined by a smooth maximum to a
    capped vertical neck cylinder, plus radial bumps for the facial features.
    """
    x, y, z = grid.directions.T
    depth = np.where(z > 0, 0.088, 0.100)  # face side flatter than the back of the head
    skull = 1.0 / np.sqrt((x / 0.078) ** 2 + (y / 0.105) ** 2 + (z / depth) ** 2)
    horizontal = np.hypot(x, z)
    neck_side = 0.05 / np.maximum(horizontal, 1e-9)  # cylinder of radius 5 cm around the y axis
    neck_cap = np.where(y < 0, 0.17 / np.maximum(-y, 1e-9), 0.0)  # its bottom at y = -17 cm
    neck = np.where(y < 0, np.minimum(neck_side, neck_cap), 0.0)
    softness = 0.006
    radius = softness * np.logaddexp(skull / softness, neck / softness)
    features = [  # (amplitude m, lon, lat, width lon, width lat) in degrees
        (0.024, 0.0, -3.0, 6.0, 9.0),  # nose
        (0.008, 0.0, 10.0, 5.0, 8.0),  # nose bridge
        (0.005, -20.0, 22.0, 14.0, 5.0),  # brows
        (0.005, 20.0, 22.0, 14.0, 5.0),
        (-0.007, -22.0, 12.0, 8.0, 5.0),  # eye sockets
        (-0.007, 22.0, 12.0, 8.0, 5.0),
        (0.004, -32.0, 2.0, 12.0, 10.0),  # cheekbones
        (0.004, 32.0, 2.0, 12.0, 10.0),
        (0.005, 0.0, mouth_lat, 16.0, 6.0),  # lips
        (0.006, 0.0, -40.0, 12.0, 7.0),  # chin
        (0.008, -92.0, 0.0, 5.0, 10.0),  # ears
        (0.008, 92.0, 0.0, 5.0, 10.0),
    ]
    for amplitude, lon, lat, width_lon, width_lat in features:
        radius = radius + amplitude * _bump(grid, lon, lat, width_lon, width_lat)
    return radius


def _smooth_fields(
    directions: np.ndarray,
    rng: np.random.Generator,
    max_norms: np.ndarray,
    mask: np.ndarray | None = None,
    sharpness: float = 6.0,
) -> np.ndarray:
    """Random smooth displacement fields (V,3,K), field k with largest vertex norm max_norms[k].

    Each field is a random combination of 64 Gaussian bumps on the sphere of directions (half
    height at about 28° from their centres at the default sharpness, 19° at 14), optionally
    multiplied by a per-vertex mask (V,) or (V,K).
    """
    count = len(max_norms)
    golden = np.pi * (3.0 - np.sqrt(5.0))
    index = np.arange(64)
    height = 1.0 - 2.0 * (index + 0.5) / 64
    centres = np.stack(
        [np.sqrt(1 - height**2) * np.cos(golden * index), height, np.sqrt(1 - height**2) * np.sin(golden * index)],
        axis=1,
    )  # (64,3) Fibonacci sphere
    features = np.exp(sharpness * (directions @ centres.T - 1.0))  # (V,64)
    fields = np.einsum("vm,mck->vck", features, rng.standard_normal((64, 3, count)))  # (V,3,K)
    if mask is not None:
        fields = fields * (mask[:, None, :] if mask.ndim == 2 else mask[:, None, None])
    norms = np.linalg.norm(fields, axis=1).max(axis=0)  # (K,)
    return fields * (np.asarray(max_norms) / norms)


def _skinning_weights(grid: _SphereGrid, mouth_row: int) -> np.ndarray:
    """(V,5) weights: root on the lower neck, jaw below the mouth line at the front, eyes on
    small discs, the neck joint (which carries the head) on the rest. Rows sum to 1."""
    lat, lon = grid.vertex_lat, grid.vertex_lon
    root = _smoothstep(lat, -58.0, -72.0)
    below_mouth = (lat <= grid.lat[mouth_row]).astype(np.float64)  # a whole grid row: a clean lip line
    front = 1.0 - _smoothstep(np.abs(lon), 55.0, 95.0)
    jaw = below_mouth * front * (1.0 - root)
    eyes = [0.9 * (1.0 - _smoothstep(_angle_to(grid, *EYE_CENTRES[name]), 3.0, 7.0)) for name in EYE_CENTRES]
    neck = 1.0 - root - jaw - eyes[0] - eyes[1]
    return np.stack([root, neck, jaw, *eyes], axis=1)


def _angle_to(grid: _SphereGrid, lon: float, lat: float) -> np.ndarray:
    """Angle in degrees (V,) between each vertex direction and the direction (lon, lat)."""
    cosine = grid.directions @ _SphereGrid.direction(np.array(lon), np.array(lat))
    return np.rad2deg(np.arccos(np.clip(cosine, -1.0, 1.0)))


def _joint_regressor(grid: _SphereGrid) -> scipy.sparse.csc_matrix:
    """(5,V) rows averaging vertex groups: the ring of the neck base (root), the ring below
    the skull (neck), both ears (jaw hinge), a small disc around each eye."""
    groups = [
        grid.vertex_lat == grid.lat[np.argmin(np.abs(grid.lat + 80.0))],
        grid.vertex_lat == grid.lat[np.argmin(np.abs(grid.lat + 55.0))],
        (_angle_to(grid, 92.0, -8.0) < 10.0) | (_angle_to(grid, -92.0, -8.0) < 10.0),
        _angle_to(grid, *EYE_CENTRES["left_eye"]) < 6.0,
        _angle_to(grid, *EYE_CENTRES["right_eye"]) < 6.0,
    ]
    dense = np.stack([group / group.sum() for group in groups])  # (5,V)
    return scipy.sparse.csc_matrix(dense)


def _ibug_angles(grid: _SphereGrid, mouth_row: int) -> np.ndarray:
    """(lon, lat) in degrees (51,2) of the static iBUG landmarks 17..67 on the synthetic face.

    The mouth line runs between grid rows ``mouth_row`` (the top row skinned to the jaw) and
    ``mouth_row + 1``. Upper-lip points lie in the strip above it (no jaw weight), lower-lip
    points in the strip below it (full jaw weight), the mouth corners on the line itself.
    """
    rows = grid.lat
    line = 0.5 * (rows[mouth_row] + rows[mouth_row + 1])

    def above(fraction: float) -> float:
        return rows[mouth_row + 1] + fraction * (rows[mouth_row + 2] - rows[mouth_row + 1])

    def below(fraction: float) -> float:
        return rows[mouth_row] - fraction * (rows[mouth_row] - rows[mouth_row - 1])

    right_brow = [(-36, 21.0), (-30, 23.5), (-23, 24.5), (-16, 24.0), (-10, 22.5)]  # 17..21, outer to inner
    left_brow = [(-lon, lat) for lon, lat in reversed(right_brow)]  # 22..26, inner to outer
    nose_bridge = [(0, 11.0), (0, 6.5), (0, 2.0), (0, -3.0)]  # 27..30, 30 = nose tip
    nose_bottom = [(-7, -8.0), (-3.5, -8.5), (0, -9.0), (3.5, -8.5), (7, -8.0)]  # 31..35
    right_eye = [(-31, 12.0), (-25, 14.5), (-19, 14.5), (-13, 12.0), (-19, 9.5), (-25, 9.5)]  # 36..41
    left_eye = [(13, 12.0), (19, 14.5), (25, 14.5), (31, 12.0), (25, 9.5), (19, 9.5)]  # 42..47
    outer_lips = [
        (-16, line), (-11, above(0.3)), (-5.5, above(0.7)), (0, above(0.7)), (5.5, above(0.7)), (11, above(0.3)),
        (16, line), (11, below(0.3)), (5.5, below(0.7)), (0, below(0.7)), (-5.5, below(0.7)), (-11, below(0.3)),
    ]  # 48..59: right corner, upper lip to the left corner, lower lip back
    inner_lips = [
        (-13, line), (-5.5, above(0.15)), (0, above(0.15)), (5.5, above(0.15)),
        (13, line), (5.5, below(0.15)), (0, below(0.15)), (-5.5, below(0.15)),
    ]  # 60..67
    table = right_brow + left_brow + nose_bridge + nose_bottom + right_eye + left_eye + outer_lips + inner_lips
    return np.array(table, dtype=np.float64)


def _contour_angles(yaw_degrees: float) -> np.ndarray:
    """(lon, lat) in degrees (17,2) of the contour landmarks 0..16 for a head yaw.

    Frontal contour: from the subject's right temple (lon -78°) down to the chin and up to the
    left one. When the head yaws by θ the silhouette moves by -θ in head longitude, so each
    point shifts by -θ·|s| (s from -1 at point 0 to 1 at point 16; the chin stays).
    """
    s = np.linspace(-1.0, 1.0, 17)
    lon = np.clip(78.0 * s - yaw_degrees * np.abs(s), -115.0, 115.0)
    lat = -45.0 + 55.0 * np.abs(s) ** 1.5
    return np.stack([lon, lat], axis=1)


def _landmark_embedding(grid: _SphereGrid, mouth_row: int) -> dict[str, object]:
    """The landmark dict in the layout of FLAME's ``landmark_embedding.npy``.

    Dynamic row r holds the contour for a = r (r <= 39) or a = 39 - r (r >= 40), where a is
    minus the head yaw in degrees (see :func:`ofer.flame.flame.contour_table_row`).
    """
    static_faces, static_bary = grid.locate(*_ibug_angles(grid, mouth_row).T)
    angle = np.arange(2 * MAX_CONTOUR_YAW + 1)
    angle = np.where(angle <= MAX_CONTOUR_YAW, angle, MAX_CONTOUR_YAW - angle)  # a per row
    contour = np.stack([_contour_angles(-a) for a in angle])  # (79,17,2)
    dynamic_faces, dynamic_bary = grid.locate(contour[..., 0], contour[..., 1])
    full_faces = np.concatenate([dynamic_faces[0], static_faces])[None]  # (1,68)
    full_bary = np.concatenate([dynamic_bary[0], static_bary])[None]  # (1,68,3)
    return {
        "static_lmk_faces_idx": static_faces,
        "static_lmk_bary_coords": static_bary,
        # the real file stores these two as torch tensors
        "dynamic_lmk_faces_idx": torch.from_numpy(dynamic_faces),
        "dynamic_lmk_bary_coords": torch.from_numpy(dynamic_bary.astype(np.float32)),
        "full_lmk_faces_idx": full_faces,
        "full_lmk_bary_coords": full_bary,
    }


class _ChumpyArray:
    """Written as a ``chumpy.ch.Ch`` object, like the arrays of real FLAME files.

    The state mirrors what ``chumpy.Ch.__getstate__`` pickles: its ``__dict__`` without the
    caches, i.e. the array ``x`` plus bookkeeping (including a set, pickled as a global).
    """

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __getstate__(self) -> dict[str, object]:
        return {
            "x": self.x,
            "_dirty_vars": {"x"},
            "_itr": None,
            "_depends_on_deps": {},
            "_make_dense": False,
            "_make_sparse": False,
        }


class _FlameFormatPickler(pickle._Pickler):
    """Protocol-2 pickler that writes some globals under the names old FLAME files use."""

    legacy_globals = {
        _ChumpyArray: ("chumpy.ch", "Ch"),
        scipy.sparse.csc_matrix: ("scipy.sparse.csc", "csc_matrix"),
        np.zeros(1).__reduce__()[0]: ("numpy.core.multiarray", "_reconstruct"),  # numpy's array rebuild
    }

    def save_global(self, obj: object, name: str | None = None) -> None:
        legacy = self.legacy_globals.get(obj)
        if legacy is None:
            super().save_global(obj, name)
            return
        self.write(pickle.GLOBAL + f"{legacy[0]}\n{legacy[1]}\n".encode("ascii"))
        self.memoize(obj)


def build_synthetic_flame(seed: int = 0) -> tuple[dict[str, object], dict[str, object]]:
    """The synthetic model dict (FLAME key names and types) and landmark dict for a seed."""
    rng = np.random.default_rng(seed)
    grid = _SphereGrid()
    mouth_row = int(np.searchsorted(grid.lat, MOUTH_LAT, side="right") - 1)
    mouth_lat = 0.5 * (grid.lat[mouth_row] + grid.lat[mouth_row + 1])

    v_template = grid.directions * _head_radius(grid, mouth_lat)[:, None]  # (V,3)
    v_template += _smooth_fields(grid.directions, rng, np.array([0.0015]))[..., 0]  # per-seed variation
    v_template[:, 1] -= v_template[:, 1].mean()
    v_template[:, 2] += NOSE_TIP_Z - v_template[:, 2].max()

    # Identity reshapes the face (not the back of the head) with bumps of about 19° half width,
    # so a photo shows it. Like a PCA basis for whitened coefficients, the first components carry
    # the variance; it falls off fast (12, 4.4, 1.6, 0.6 mm, ...) so that a few minutes of CPU
    # training can learn to see it.
    face = _bump(grid, 0.0, 0.0, 75.0, 65.0)
    identity = _smooth_fields(grid.directions, rng, 0.012 * np.exp(-np.arange(300.0)), face,
                              sharpness=14.0)  # (V,3,300)
    regions = [(0.0, mouth_lat, 18.0, 10.0), (0.0, mouth_lat, 18.0, 10.0), (0.0, -35.0, 15.0, 10.0)]
    regions += [(lon, lat, 9.0, 7.0) for lon, lat in EYE_CENTRES.values()]
    regions += [(lon, 22.0, 12.0, 6.0) for lon, _ in EYE_CENTRES.values()]  # brows
    masks = np.stack([_bump(grid, *regions[k % len(regions)]) for k in range(100)], axis=1)  # (V,100)
    # Expression falls off fast too (6, 3.6, 2.2, 1.3 mm, ...): one strong component per region.
    expression = _smooth_fields(grid.directions, rng, 0.006 * np.exp(-np.arange(100) / 2.0), masks)  # (V,3,100)

    weights = _skinning_weights(grid, mouth_row)  # (V,5)
    # correctives of joint j only move vertices that joint j skins
    pose_masks = np.repeat(weights[:, 1:], 9, axis=1)  # (V,36)
    posedirs = _smooth_fields(grid.directions, rng, np.full(36, 0.003), pose_masks)  # (V,3,36)
    J_regressor = _joint_regressor(grid)

    model = {
        "f": grid.faces.astype(np.uint32),
        "J_regressor": J_regressor,
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "J": _ChumpyArray(J_regressor @ v_template),
        "bs_style": "lbs",
        "weights": _ChumpyArray(weights),
        "posedirs": posedirs,
        "v_template": _ChumpyArray(v_template),
        "shapedirs": _ChumpyArray(np.concatenate([identity, expression], axis=2)),  # (V,3,400)
        "bs_type": "lrotmin",
    }
    return model, _landmark_embedding(grid, mouth_row)


def write_synthetic_flame(out_dir: str | os.PathLike, seed: int = 0) -> SyntheticFlamePaths:
    """Write a synthetic ``generic_model.pkl``, ``landmark_embedding.npy`` and ``frontindices.npy``.

    Same seed, same model. A ``SYNTHETIC.txt`` beside them says what they are.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, landmarks = build_synthetic_flame(seed)
    paths = SyntheticFlamePaths(
        model=out_dir / "generic_model.pkl",
        landmarks=out_dir / "landmark_embedding.npy",
        front_indices=out_dir / "frontindices.npy",
    )
    with paths.model.open("wb") as file:
        _FlameFormatPickler(file, protocol=2).dump(model)
    np.save(paths.landmarks, np.array(landmarks, dtype=object), allow_pickle=True)
    np.save(paths.front_indices, front_face_indices(model["v_template"].x, model["f"]))
    (out_dir / "SYNTHETIC.txt").write_text(
        f"Synthetic FLAME-format model written by ofer.flame.synthetic (seed {seed}).\n"
        "Random smooth bases on a made-up head mesh, for tests and demos only.\n"
        "It is NOT the FLAME face model and not a model of human faces.\n"
    )
    logger.info("wrote a synthetic FLAME-format model (not a real face model, seed %d) to %s", seed, out_dir)
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: write a synthetic FLAME-format model to a folder."""
    parser = argparse.ArgumentParser(description="Write a SYNTHETIC model in FLAME's file formats (tests, demo).")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = write_synthetic_flame(args.out, seed=args.seed)
    print(f"synthetic FLAME-format model: {paths.model}\nlandmarks: {paths.landmarks}\nfront indices: {paths.front_indices}")


if __name__ == "__main__":
    main()
