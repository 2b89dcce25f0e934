"""A synthetic data set any machine can make: rendered faces of the synthetic FLAME-format model.

Random identities, expressions and jaw poses of the *synthetic* model (never a real face
model) are rendered on the CPU with random head pose, lighting, skin colour (with painted
eyes, brows and lips that move with the mesh) and background, cropped exactly as real
photos are (`ofer.preprocess.prepare_face` from the projected 5 keypoints and a landmark
box), optionally occluded, and written in the real on-disk layout so the real loaders read
it (SPEC §8):

  <out>/flame/                      generic_model.pkl, landmark_embedding.npy, frontindices.npy,
                                    mean_shape.ply (the model's mean face in mm, a baseline)
  <out>/<NAME>/arcface_input/<actor>/<img>.jpg + .npy     224 crop + ArcFace input
  <out>/<NAME>/FLAME_parameters/<actor>/identity.npz      MICA layout: betas (400), pose (15)
  <out>/<NAME>/FLAME_parameters/<actor>/<img>.npz         TEMPEH layout: shape, exp, pose, trans
  <out>/image_paths/<NAME>.npy      identity list (MICA: actor -> ([images], npz))
  <out>/expression_paths/<NAME>.npy expression list (actor -> [[image, params], ...])
  <out>/test/<name>.jpg + .npy, list.txt                  held-out test images for test.py
  <out>/test_gt/<name>.ply, <name>_occlusion.npy, <name>_params.npz    expressive ground truth
  <out>/test_gt/neutral/<name>.ply, <name>_lmk7.npy       neutral identity ground truth
  <out>/VERSION                     GENERATOR_VERSION of the code that wrote it

NAME is SYNTH (training actors) and SYNTHVAL (held-out validation actors). Ground truth
for the test images: the neutral identity mesh and the expressive mesh in mm, the 7 NoW
landmarks, and a per-vertex mask of the vertices covered by the occluder.

The test set draws from its own random stream, so it does not depend on the number of
actors and ``--test-only`` (``generate(..., training=False)``) writes just the model and the
test set, in seconds.

Command: ``python -m ofer.data.synthetic --out data/synthetic [--actors 1500 ...] [--test-only]``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from ofer.data.occlusion import OcclusionAugment
from ofer.flame import FLAME
from ofer.flame.flame import NOW_LANDMARKS
from ofer.flame.synthetic import write_synthetic_flame
from ofer.io import save_npy, save_npz, write_image, write_ply
from ofer.preprocess import arcface_matrix_224_to_112, five_keypoints, prepare_face, transform_points
from ofer.progress import progress
from ofer.render import flame_to_camera, perspective_project, render_mesh

log = logging.getLogger(__name__)

IMAGE_SIZE = 320  # large enough that the 1.6x FaRL box stays inside the photo
FOCAL = 700.0  # pixels; with DISTANCE the head spans about 80% of the image height
DISTANCE = 0.55  # metres from the camera
N_SHAPE, N_EXP = 300, 100  # coefficients stored per fit (MICA `betas` = 300 shape + 100 expression)
# Bumped whenever the generator makes different data; written to <out>/VERSION.
# 2: painted features, few strong identity/expression components; 3: the test set draws from
# its own random stream (the training actors are the same as in 2).
GENERATOR_VERSION = "3"
TEST_STREAM = 1  # the test set's generator is default_rng([seed, TEST_STREAM]): independent of the actor counts


@dataclass
class SyntheticSettings:
    """How many faces to make and how varied they are."""

    actors: int = 1500  # many identities: with a few hundred the encoders memorise them
    val_actors: int = 40
    images_per_actor: int = 2
    test_images: int = 12
    occluded_fraction: float = 0.5  # of the test images, and of the training images
    shape_std: float = 1.0  # coefficients are whitened as in FLAME; the model's bases carry the decay
    expression_std: float = 1.0
    max_jaw_open: float = 0.25  # radians
    max_yaw: float = 20.0  # degrees
    max_pitch: float = 10.0
    seed: int = 0


class FaceRenderer:
    """Draws FLAME parameter sets of the synthetic model as cropped face photos."""

    def __init__(self, flame: FLAME):
        self.flame = flame
        self.faces = flame.faces.cpu().numpy()

    @torch.no_grad()
    def vertices(self, shape: np.ndarray, exp: np.ndarray, jaw: np.ndarray) -> np.ndarray:
        """FLAME vertices (metres, FLAME frame, no global rotation): (V, 3)."""
        return self.flame(_row(shape), expression=_row(exp), jaw=_row(jaw))[0].numpy()

    @torch.no_grad()
    def landmarks68(self, vertices: np.ndarray) -> np.ndarray:
        """68 landmarks (68, 3) of an unposed mesh (V, 3)."""
        return self.flame.landmarks68(_row(vertices))[0].numpy()

    def photo(self, vertices: np.ndarray, rotation: np.ndarray, rng: np.random.Generator,
              albedo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Render a posed head over a random background.

        Returns the photo (H, W, 3) BGR, the screen vertices (V, 3) and screen landmarks (68, 2).
        """
        translation = np.array([rng.normal(0, 0.005), rng.normal(0, 0.005), -DISTANCE])
        screen = perspective_project(flame_to_camera(vertices, rotation, translation), FOCAL,
                                     IMAGE_SIZE / 2, IMAGE_SIZE / 2)
        background = random_background(rng)
        light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.3), 1.0])
        image, _ = render_mesh(screen, self.faces, IMAGE_SIZE, IMAGE_SIZE, background=background,
                               light_dir=light, albedo=albedo, ambient=rng.uniform(0.25, 0.45))
        lmk = perspective_project(flame_to_camera(self.landmarks68(vertices), rotation, translation), FOCAL,
                                  IMAGE_SIZE / 2, IMAGE_SIZE / 2)[:, :2]
        return image, screen, lmk


def _row(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a float32 batch of one."""
    return torch.as_tensor(array, dtype=torch.float32)[None]


def random_background(rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour gradient with mild noise, (H, W, 3) uint8 BGR."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ramp = np.linspace(0, 1, IMAGE_SIZE)[None, :, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    image = c0 * (1 - ramp) + c1 * ramp + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def facial_features(vertices: np.ndarray, lmk68: np.ndarray) -> np.ndarray:
    """Where a neutral face (V, 3) has its eyes, brows and lips: weights (V, 3) in [0, 1].

    The weights follow the 68 landmarks of the template, so the painted features move with
    every identity and expression deformation and a photo shows them, as real faces do.
    """

    def near(points: np.ndarray, radius: float, closed: bool = False) -> np.ndarray:
        ends = np.roll(points, -1, axis=0) if closed else points[1:]
        starts = points if closed else points[:-1]
        t = np.linspace(0, 1, 12)[:, None, None]
        dense = (starts[None] * (1 - t) + ends[None] * t).reshape(-1, 3)  # (12·segments, 3)
        distance = np.linalg.norm(vertices[:, None] - dense[None], axis=-1).min(1)  # (V,)
        return 1 - np.clip((distance - radius) / radius, 0, 1)

    eye_radius = 0.25 * np.linalg.norm(lmk68[39] - lmk68[36])
    line = 0.003  # metres: half width of brows and lips
    eyes = np.maximum(near(lmk68[36:42], eye_radius, True), near(lmk68[42:48], eye_radius, True))
    brows = np.maximum(near(lmk68[17:22], line), near(lmk68[22:27], line))
    lips = near(lmk68[48:60], line, True)
    weights = np.stack([eyes, brows, lips], axis=1)  # (V, 3)
    return weights / np.maximum(weights.sum(1, keepdims=True), 1)


def landmark_box(lmk68: np.ndarray) -> np.ndarray:
    """A detector-like face box from the projected landmarks: x1, y1, x2, y2."""
    lo, hi = lmk68.min(0), lmk68.max(0)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    centre[1] -= 0.15 * half[1]  # detectors include the forehead
    half *= 1.1
    return np.concatenate([centre - half, centre + half])


class SampleMaker:
    """Draws random faces and turns each into (crop224, arcface input, occlusion mask, GT)."""

    def __init__(self, flame: FLAME, settings: SyntheticSettings):
        self.renderer = FaceRenderer(flame)
        self.s = settings
        self.occluder = OcclusionAugment(prob=1.0, min_area=0.08, max_area=0.3)
        zeros = np.zeros(N_SHAPE, np.float32)
        self.template = self.renderer.vertices(zeros, zeros[:50], zeros[:3])  # (V, 3) the mean face
        self.features = facial_features(self.template, self.renderer.landmarks68(self.template))

    def identity(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A random shape (300,) and per-vertex albedo (V, 3) BGR in [0, 1]."""
        shape = rng.normal(0, self.s.shape_std, N_SHAPE).astype(np.float32)
        tone = rng.uniform(0.35, 0.85)
        skin = np.clip(np.array([0.55 * tone + 0.1, 0.7 * tone + 0.1, tone + 0.1]) * rng.uniform(0.9, 1.1, 3), 0, 1)
        lips = skin * np.array([0.65, 0.6, 0.95])
        brows = skin * rng.uniform(0.2, 0.5)
        eyes = np.full(3, rng.uniform(0.05, 0.2))
        f = self.features  # (V, 3) weights of eyes, brows, lips
        albedo = skin * (1 - f.sum(1, keepdims=True)) + f[:, :1] * eyes + f[:, 1:2] * brows + f[:, 2:] * lips
        return shape, np.clip(albedo, 0, 1)

    def expression(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Random expression coefficients (100,) (the first 50 are used) and jaw pose (3,)."""
        exp = np.zeros(N_EXP, dtype=np.float32)
        exp[:50] = rng.normal(0, self.s.expression_std, 50)
        jaw = np.array([rng.uniform(0, self.s.max_jaw_open), rng.normal(0, 0.02), rng.normal(0, 0.02)], np.float32)
        return exp, jaw

    def sample(self, shape: np.ndarray, albedo: np.ndarray, exp: np.ndarray, jaw: np.ndarray,
               occlude: bool, rng: np.random.Generator) -> dict:
        """Render one face and crop it like a photo; returns crops, mask and meshes."""
        r = self.renderer
        verts = r.vertices(shape, exp[:50], jaw)
        yaw, pitch, roll = rng.uniform(-1, 1) * self.s.max_yaw, rng.uniform(-1, 1) * self.s.max_pitch, rng.normal(0, 3)
        rotation = Rotation.from_euler("yxz", [yaw, pitch, roll], degrees=True).as_matrix()
        photo, screen, lmk = r.photo(verts, rotation, rng, albedo)
        face = prepare_face(photo, five_keypoints(lmk), landmark_box(lmk))
        crop, arcface = face.crop224, face.arcface
        mask = np.zeros(crop.shape[:2], dtype=bool)
        if occlude:
            crop, arcface, mask = self.occluder(crop, arcface, arcface_matrix_224_to_112(face.m224, face.m112), rng)
        # Vertices whose projection falls under the occluder (224-crop pixels).
        pix = np.round(transform_points(face.m224, screen[:, :2])).astype(int)
        inside = (pix >= 0).all(1) & (pix < crop.shape[0]).all(1)
        occluded = np.zeros(len(verts), dtype=bool)
        occluded[inside] = mask[pix[inside, 1], pix[inside, 0]]
        return {"crop": crop, "arcface": arcface, "occluded": occluded, "vertices": verts}


def generate(out: Path, settings: SyntheticSettings, training: bool = True) -> Path:
    """Write the synthetic data set under `out` (see the module docstring); return `out`.

    With `training=False` only the model (flame/) and the held-out test set are written, in
    seconds: the same test set as a full run, since it has its own random stream.
    """
    out = Path(out)
    paths = write_synthetic_flame(out / "flame", seed=settings.seed)
    flame = FLAME(str(paths.model), n_shape=N_SHAPE, n_exp=50, landmark_embedding_path=str(paths.landmarks))
    maker = SampleMaker(flame, settings)
    write_ply(out / "flame" / "mean_shape.ply", maker.template * 1000.0, maker.renderer.faces)
    if training:
        rng = np.random.default_rng(settings.seed)
        _write_actors(out, "SYNTH", settings.actors, maker, settings, rng)
        _write_actors(out, "SYNTHVAL", settings.val_actors, maker, settings, rng)
    _write_test_set(out, maker, settings, np.random.default_rng([settings.seed, TEST_STREAM]))
    (out / "VERSION").write_text(GENERATOR_VERSION + "\n")
    log.info("synthetic %s written to %s", "data set" if training else "model and test set", out)
    return out


def generator_version(out: Path) -> str | None:
    """GENERATOR_VERSION of the data set under `out`: None if there is none, "1" if unstamped."""
    out = Path(out)
    if not (out / "test" / "list.txt").is_file():
        return None
    stamp = out / "VERSION"
    return stamp.read_text().strip() if stamp.is_file() else "1"


def has_training_data(out: Path) -> bool:
    """Whether `out` holds the training actors (a `training=False` run writes none)."""
    return all((Path(out) / "image_paths" / f"{name}.npy").is_file() for name in ("SYNTH", "SYNTHVAL"))


def _write_actors(out: Path, name: str, count: int, maker: SampleMaker, s: SyntheticSettings,
                  rng: np.random.Generator) -> None:
    """Identity + expression training data for `count` actors of data set `name`."""
    identity_list, expression_list = {}, {}
    for a in progress(range(count), desc=name, unit="actor"):
        actor = f"{name.lower()}_{a:04d}"
        shape, albedo = maker.identity(rng)
        params_dir = out / name / "FLAME_parameters" / actor
        save_npz(params_dir / "identity.npz", betas=np.concatenate([shape, np.zeros(N_EXP, np.float32)]),
                 pose=np.zeros(15, np.float32))
        images, pairs = [], []
        for i in range(s.images_per_actor):
            exp, jaw = maker.expression(rng)
            sample = maker.sample(shape, albedo, exp, jaw, rng.random() < s.occluded_fraction, rng)
            rel = f"arcface_input/{actor}/{i:03d}.jpg"
            write_image(out / name / rel, sample["crop"])
            save_npy((out / name / rel).with_suffix(".npy"), sample["arcface"])
            pose = np.zeros(12, np.float32)  # TEMPEH order: neck 0:3, jaw 3:6, eyes 6:12
            pose[3:6] = jaw
            save_npz(params_dir / f"{i:03d}.npz", shape=shape, exp=exp, pose=pose, trans=np.zeros(3, np.float32))
            images.append(rel)
            pairs.append([rel, f"FLAME_parameters/{actor}/{i:03d}.npz"])
        identity_list[actor] = (images, f"FLAME_parameters/{actor}/identity.npz")
        expression_list[actor] = pairs
    for folder, table in (("image_paths", identity_list), ("expression_paths", expression_list)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        np.save(out / folder / f"{name}.npy", table, allow_pickle=True)


def _write_test_set(out: Path, maker: SampleMaker, s: SyntheticSettings, rng: np.random.Generator) -> None:
    """Held-out faces in the flat layout test.py reads, with ground truth beside them."""
    names = []
    faces = maker.renderer.faces
    for i in range(s.test_images):
        occluded = i < round(s.occluded_fraction * s.test_images)
        name = f"{'occluded' if occluded else 'clear'}_{i:02d}"
        shape, albedo = maker.identity(rng)
        exp, jaw = maker.expression(rng)
        sample = maker.sample(shape, albedo, exp, jaw, occluded, rng)
        write_image(out / "test" / f"{name}.jpg", sample["crop"])
        save_npy(out / "test" / f"{name}.npy", sample["arcface"])
        neutral = maker.renderer.vertices(shape, np.zeros(50, np.float32), np.zeros(3, np.float32))
        gt = out / "test_gt"
        write_ply(gt / f"{name}.ply", sample["vertices"] * 1000.0, faces)
        save_npy(gt / f"{name}_occlusion.npy", sample["occluded"])
        save_npz(gt / f"{name}_params.npz", shape=shape, exp=exp, jaw=jaw)
        write_ply(gt / "neutral" / f"{name}.ply", neutral * 1000.0, faces)
        save_npy(gt / "neutral" / f"{name}_lmk7.npy", maker.renderer.landmarks68(neutral)[NOW_LANDMARKS] * 1000.0)
        names.append(name)
    (out / "test" / "list.txt").write_text("\n".join(names) + "\n")


def main(argv: list[str] | None = None) -> None:
    defaults = SyntheticSettings()
    p = argparse.ArgumentParser(description="Make the synthetic OFER data set (synthetic FLAME-format model).")
    p.add_argument("--out", required=True, help="output root, e.g. data/synthetic")
    for key, value in vars(defaults).items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--test-only", action="store_true", help="only the model and the held-out test set (seconds)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = SyntheticSettings(**{k: getattr(args, k) for k in vars(defaults)})
    print(f"synthetic data written to {generate(Path(args.out), settings, training=not args.test_only)}")


if __name__ == "__main__":
    main()
