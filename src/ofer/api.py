"""The Python API: load OFER once, reconstruct preprocessed crops (or photos), look at or save the results.

    import ofer
    model = ofer.load_demo()                                   # the bundled demo models, synthetic FLAME
    # model = ofer.load(idrank="checkpoint/model_idrank.tar", idgen="checkpoint/model_idgen_flame20.tar",
    #                   expgen="checkpoint/model_expgen_flame20.tar", cfg="configs/test_flame20.yml")
    result = model.reconstruct_crop("data/synthetic/test/clear_00.jpg", sampler="dpmpp_2m", steps=10)
    result.neutral_mesh          # (V, 3) mm, IdRank's pick
    result.save("output/mine")   # the files test.py writes for this image

test.py is built on this module: the same settings rules (`sampling_overrides`), the same
per-image random generator (`image_generator`: an image's samples depend on the seed and its
name only), the same batching with a failed batch retried one image at a time, and the same
writer (`Result.save` is `ofer.inference.export.write_outputs`).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ofer.config import Config, ConfigError, TestConfig, config_to_dict, load_config, override_config
from ofer.device import resolve_device
from ofer.diffusion.noise import seeded_generator
from ofer.diffusion.samplers import FIXED_SEQUENCE
from ofer.diffusion.solvers import SOLVERS
from ofer.inference.batching import auto_batch_size
from ofer.inference.export import write_outputs
from ofer.inference.pipeline import OferPipeline, Reconstruction, crop_tensors, load_inputs
from ofer.io import InputError, failure_reason, read_image

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # the checkout, for load_demo (models/demo/, configs/demo/)

# Sampling arguments of the API (and test.py's flags of the same names) -> their test.* config keys.
SAMPLING_KEYS = {"num_shapes": "numsamples", "num_expressions": "num_expressions", "sampler": "sampling",
                 "steps": "steps", "exp_sampler": "exp_sampling", "exp_steps": "exp_steps", "seed": "seed",
                 "dtype": "dtype", "compile": "compile", "cuda_graph": "cuda_graph"}


def sampling_overrides(sampling: dict[str, Any], opts: Sequence[str] = ()) -> list[str]:
    """Config overrides (`test.key=value`) for sampling arguments, with test.py's rules.

    A fixed-sequence sampler (`ddpm`, `ddim_legacy`) given without steps drops the config's
    step count, which was meant for the config's own sampler; `opts` (test.py's `--opt`)
    come after that and before the arguments, so an explicit step count is kept (and refused).
    """
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(unknown)}; valid: {', '.join(SAMPLING_KEYS)}")
    drops = [f"test.{key}=null" for sampler, steps, key in (
        (sampling.get("sampler"), sampling.get("steps"), "steps"),
        (sampling.get("exp_sampler"), sampling.get("exp_steps"), "exp_steps"))
        if sampler in FIXED_SEQUENCE and steps is None]
    sets = [f"test.{SAMPLING_KEYS[k]}={v}" for k, v in sampling.items() if v is not None]
    return [*drops, *opts, *sets]


def image_generator(seed: int, name: str) -> torch.Generator:
    """The source of one image's noise: its samples depend on `seed` and its name only.

    The seed is the CRC-32 of the name computed from `seed` as initial value: 32 bits, as the
    CPU generator uses only those, and different for every seed of one name. The generator is a
    CPU one whatever the device (`ofer.diffusion.noise.randn` moves what it draws), so a seed
    gives the same samples on a CPU and a GPU, up to float rounding.
    """
    return seeded_generator(zlib.crc32(name.encode(), seed % 2**32))


def checkpoint_records(checkpoints: dict[str, str | Path]) -> dict[str, dict]:
    """Per stage: where its checkpoint is, when it was written and what it holds (first 16 hex digits
    of its sha256, so a file retrained or replaced under the same name is told apart). Missing
    files get a record without time and hash (loading them fails with its own message)."""
    records = {}
    for stage, path in checkpoints.items():
        resolved = Path(path).resolve()
        records[stage] = {"path": str(resolved), "modified": None, "sha256": None}
        if resolved.is_file():
            digest = hashlib.sha256()
            with open(resolved, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
            stamp = time.localtime(resolved.stat().st_mtime)
            records[stage].update(modified=time.strftime("%Y-%m-%d %H:%M:%S", stamp), sha256=digest.hexdigest()[:16])
    return records


def run_settings(cfg: Config, test: TestConfig, checkpoints: dict[str, dict]) -> dict:
    """Everything that decides an image's outputs besides its input: sampling, models (done.json, summary.json)."""
    recorded = {k: v for k, v in config_to_dict(test).items() if not k.endswith("_config")}
    return {**recorded, "jaw_scale": cfg.model.jaw_scale, **checkpoints}


class ImageError(Exception):
    """One image could not be reconstructed; the message says which file and why."""

    def __init__(self, name: str, reason: str):
        super().__init__(reason)
        self.name, self.reason = name, reason


@dataclass
class Result:
    """One image's reconstruction: OFER's samples and meshes (mm), ready to look at or save.

    Attributes:
        name: the image's output name (test.py's: the list entry without suffix).
        reconstruction: the raw `Reconstruction` (all N shape and M expression samples).
        faces: (F, 3) FLAME triangles, shared by every mesh.
        arcface: (3, 112, 112) the ArcFace input (drawn under the mesh in the overlay picture).
        settings: the sampling settings and checkpoints that made it (recorded in done.json).
    """

    name: str
    reconstruction: Reconstruction
    faces: np.ndarray
    arcface: np.ndarray
    settings: dict
    _model: OferModel

    @property
    def neutral_mesh(self) -> np.ndarray:
        """(V, 3) IdRank's pick with a neutral expression, mm."""
        return self.reconstruction.neutral_mm

    @property
    def expression_meshes(self) -> np.ndarray:
        """(M, V, 3) the picked identity with each ExpGen sample, mm."""
        return self.reconstruction.expression_mm

    @property
    def scores(self) -> np.ndarray:
        """(N,) IdRank's score of each IdGen sample (higher is better)."""
        return self.reconstruction.scores

    @property
    def best(self) -> int:
        """Index of the picked sample among the N."""
        return self.reconstruction.best

    def shape_meshes(self, k: int | None = None) -> np.ndarray:
        """(k, V, 3) the k best-ranked IdGen samples as neutral meshes (mm), best first; all N when k is None."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return self._model.flame_meshes(self.reconstruction.shapes[order])

    def save(self, out: str | Path, name: str | None = None, run: str | None = None,
             mesh_format: str = "ply") -> dict:
        """Write the files test.py writes for this image into `out` (under `name`); return its done marker.

        `mesh_format`: `ply` (as the original), `obj`, or `both` (test.py's --mesh-format).
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        provenance = {"settings": self.settings, **({"run": run} if run is not None else {})}
        return write_outputs(out, name or self.name, self.reconstruction, self.faces, self.arcface,
                             self.settings["num_saved_expressions"], provenance, mesh_format)

    def to_trimesh(self, which: str | int = "neutral") -> Any:
        """A `trimesh.Trimesh` (mm) of the neutral pick (`"neutral"`) or of expression sample `which` (int)."""
        import trimesh

        vertices = self.neutral_mesh if which == "neutral" else self.expression_meshes[which]
        return trimesh.Trimesh(vertices=vertices, faces=self.faces, process=False)


class OferModel:
    """The three stages and FLAME, loaded once (`load`, `load_demo`); reconstructs crops in batches."""

    def __init__(self, pipeline: OferPipeline, cfg: Config, checkpoints: dict[str, dict], load_seconds: float = 0.0):
        self.pipeline, self.cfg, self.checkpoints, self.load_seconds = pipeline, cfg, checkpoints, load_seconds
        self.faces = pipeline.flame.faces.cpu().numpy()  # (F, 3)
        self._detectors: dict[str, Any] = {}  # face detectors by name, built on first use

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    def settings(self, **sampling: Any) -> TestConfig:
        """The test settings of a call: the model's, changed by `sampling` (see SAMPLING_KEYS), checked.

        The same rules as test.py's flags: a value outside its range, or one the models would
        refuse (e.g. more steps than the model's diffusion steps), is a ConfigError.
        """
        if not any(v is not None for v in sampling.values()):
            return self.cfg.test
        try:
            test = override_config(self.cfg, sampling_overrides(sampling)).test
        except ConfigError as err:
            given = ", ".join(f"{k}={v!r}" for k, v in sampling.items() if v is not None)
            raise ConfigError(f"{given}: {err}") from None
        self.pipeline.check_settings(test)
        _import_solvers(test)
        return test

    def auto_batch(self, test: TestConfig, num_images: int | None = None) -> int:
        """Images reconstructed together by default: `ofer.inference.batching.auto_batch_size` for
        this device and these sizes (outputs do not depend on it, up to float rounding)."""
        return auto_batch_size(self.device, test.numsamples, test.num_expressions, self.pipeline.flame.num_vertices,
                               num_images)

    def flame_meshes(self, shapes: np.ndarray) -> np.ndarray:
        """(K, n_shape) FLAME shape coefficients -> (K, V, 3) neutral meshes in mm."""
        with torch.no_grad():
            vertices = self.pipeline.flame(torch.as_tensor(shapes, dtype=torch.float32, device=self.device))
        return (vertices * 1000.0).cpu().numpy()

    def reconstruct(self, photo: str | Path | np.ndarray, name: str | None = None, detector: str = "mtcnn",
                    keypoints: np.ndarray | None = None, box: np.ndarray | None = None, min_score: float = 0.5,
                    **sampling: Any) -> Result:
        """Reconstruct the face of a photo: a file, or an (H, W, 3) uint8 BGR array as OpenCV reads it.

        The face is found and cropped as `python -m ofer.preprocess` does (`detector` "mtcnn" or
        "scrfd", faces chosen by its rule; or the 5 `keypoints` (5, 2) in photo pixels, and
        optionally the face `box`, instead of a detector), and the crop goes through the JPEG
        encoding the saved crop would, so the result equals preprocessing followed by
        `reconstruct_crop` (and test.py). `name` (default: the file's stem, "photo" for an
        array) names the outputs and seeds the samples. Raises ImageError naming the photo.
        """
        from ofer.preprocess import KeypointEntry, crop_photo, make_detector

        label = str(photo) if isinstance(photo, (str, Path)) else "the photo array"
        name = name or (Path(photo).stem if isinstance(photo, (str, Path)) else "photo")
        test = self.settings(**sampling)
        try:
            image = read_image(photo) if isinstance(photo, (str, Path)) else check_photo_array(photo)
            if keypoints is not None:
                face, _ = crop_photo(image, name, {name: KeypointEntry(np.asarray(keypoints, float), box)}, None)
            else:
                if detector not in self._detectors:
                    self._detectors[detector] = make_detector(detector, min_score=min_score)
                face, _ = crop_photo(image, name, None, self._detectors[detector], min_score)
            crop, arcface = crop_tensors(decode_jpeg(face.crop224), face.arcface, label)
        except Exception as err:
            if isinstance(err, InputError) and label not in str(err):  # e.g. "no face found": say in what
                err = InputError(f"{label}: {err}")
            raise image_failure(name, f"{label}: cannot be used", err) from err
        [(_, result)] = self._results([(name, label, crop, arcface)], test)
        if isinstance(result, ImageError):
            raise result
        return result

    def reconstruct_crop(self, crop: str | Path, name: str | None = None, **sampling: Any) -> Result:
        """Reconstruct one preprocessed crop (`<crop>.jpg` and its `.npy` beside it, as `ofer.preprocess` writes).

        `name` (default: the file's stem) names the outputs and seeds the image's samples, as
        test.py's list entry does. Raises ImageError naming the file and what is wrong.
        """
        [result] = self.reconstruct_crops([crop], None if name is None else [name], batch=1, **sampling)
        return result

    def reconstruct_crops(self, crops: Sequence[str | Path], names: Sequence[str] | None = None,
                          batch: int | None = None, on_error: str = "raise", **sampling: Any) -> list[Result | ImageError]:
        """Reconstruct many crops, `batch` images at a time (None: `auto_batch`); one Result per crop, in order.

        `on_error="raise"` raises the first ImageError after trying every crop; `"return"` puts
        the ImageError of a failed image in its place and goes on (what test.py does).
        """
        if on_error not in ("raise", "return"):
            raise ValueError(f"on_error must be 'raise' or 'return', got {on_error!r}")
        paths = [Path(c) for c in crops]
        names = [p.stem for p in paths] if names is None else list(names)
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names for {len(paths)} crops")
        test = self.settings(**sampling)
        batch = self.auto_batch(test, len(paths)) if batch is None else batch
        results = [r for _, r in self.iter_crops(list(zip(names, paths)), batch, test)]
        errors = [r for r in results if isinstance(r, ImageError)]
        if errors and on_error == "raise":
            raise errors[0]
        return results

    def iter_crops(self, items: Sequence[tuple[str, Path]], batch: int,
                   test: TestConfig) -> Iterator[tuple[str, Result | ImageError]]:
        """(name, Result or ImageError) per (name, crop path), reconstructed `batch` at a time.

        Any exception of one image (not only ours) fails that image alone; KeyboardInterrupt ends the run.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        for start in range(0, len(items), batch):
            loaded = []
            for name, path in items[start : start + batch]:
                try:
                    loaded.append((name, path, *load_inputs(path)))
                except Exception as err:
                    yield name, image_failure(name, f"{path}: cannot be used", err)
            yield from self._results(loaded, test)

    def _results(self, loaded: list[tuple], test: TestConfig) -> Iterator[tuple[str, Result | ImageError]]:
        """(name, Result or ImageError) per loaded (name, source, crop (3, 224, 224), arcface (3, 112, 112)), together."""
        settings = run_settings(self.cfg, test, self.checkpoints)
        for (name, source, _, arcface), rec in zip(loaded, self._reconstruct(loaded, test)):
            if isinstance(rec, Exception):
                yield name, image_failure(name, f"{source}: reconstruction failed", rec)
            else:
                yield name, Result(name, rec, self.faces, arcface.numpy(), settings, self)

    def _reconstruct(self, loaded: list[tuple], test: TestConfig) -> list[Reconstruction | Exception]:
        """One result per image; the images of a batch that fails are tried again one at a time."""
        results = self._attempt(loaded, test)
        if len(loaded) > 1:
            for i, result in enumerate(results):
                if isinstance(result, Exception):
                    log.warning("%s failed in a batch of %d (%s); trying it alone", loaded[i][0], len(loaded), result)
                    results[i] = self._attempt(loaded[i : i + 1], test)[0]
        return results

    def _attempt(self, loaded: list[tuple], test: TestConfig) -> list[Reconstruction | Exception]:
        """Run the pipeline on `loaded` (name, path, crop, arcface) together; a result with NaN or Inf is an error."""
        generators = [image_generator(test.seed, name) for name, *_ in loaded]
        try:
            recs = self.pipeline(torch.stack([l[2] for l in loaded]), torch.stack([l[3] for l in loaded]),
                                 generators, test)
        except Exception as err:
            return [err] * len(loaded)
        return [_check_finite(rec) for rec in recs]


def _import_solvers(test: TestConfig) -> None:
    """Import diffusers now when a solver is used, so its seconds count as loading, not as the first image."""
    if test.sampling in SOLVERS or test.exp_sampling in SOLVERS:
        importlib.import_module("diffusers")


def check_photo_array(photo: np.ndarray) -> np.ndarray:
    """A photo given as an array must be (H, W, 3) uint8 BGR (as cv2.imread gives); InputError otherwise."""
    photo = np.asarray(photo)
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3 or min(photo.shape[:2]) < 1:
        raise InputError(f"the photo array must be (H, W, 3) uint8 BGR, got {photo.dtype} {photo.shape}")
    return np.ascontiguousarray(photo)


def decode_jpeg(crop_bgr: np.ndarray) -> np.ndarray:
    """The crop as test.py reads it back from the `.jpg` preprocessing writes (same encoder settings)."""
    ok, encoded = cv2.imencode(".jpg", crop_bgr)
    if not ok:
        raise InputError("the face crop could not be JPEG-encoded")
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)


def image_failure(name: str, context: str, err: Exception) -> ImageError:
    """The ImageError of a failed image (`failure_reason`, `context` naming the file), logged; traceback at debug."""
    reason = failure_reason(err, context)
    log.error("%s failed: %s", name, reason)
    log.debug("traceback of %s", name, exc_info=err)
    error = ImageError(name, reason)
    error.__cause__ = err
    return error


def _check_finite(rec: Reconstruction) -> Reconstruction | Exception:
    """`rec`, or an error naming its fields with NaN or infinite values (never written)."""
    bad = [f.name for f in fields(rec)
           if isinstance(getattr(rec, f.name), np.ndarray) and not np.isfinite(getattr(rec, f.name)).all()]
    return ValueError(f"the networks produced NaN or infinite values ({', '.join(bad)})") if bad else rec


def from_config(cfg: Config, idrank: str | Path, idgen: str | Path, expgen: str | Path, device: torch.device,
                records: dict[str, dict] | None = None) -> OferModel:
    """An OferModel from a loaded config and the three checkpoints (what `load` and test.py call).

    `records`: the files' `checkpoint_records`, when the caller has them already (test.py).
    """
    start = time.perf_counter()
    if records is None:
        records = checkpoint_records({"idrank": idrank, "idgen": idgen, "expgen": expgen})
    pipeline = OferPipeline.from_checkpoints(cfg, idrank, idgen, expgen, device)
    _import_solvers(cfg.test)
    return OferModel(pipeline, cfg, records, time.perf_counter() - start)


def load(idrank: str | Path, idgen: str | Path, expgen: str | Path, cfg: str | Path | None = None,
         device: str = "auto", opts: Sequence[str] = ()) -> OferModel:
    """Load OFER's three stages (original OFER files or ours) for reconstruction.

    Args:
        idrank, idgen, expgen: the checkpoints (test.py's --checkpoint1, 2, 3).
        cfg: the test config (FLAME assets, front indices, test.* defaults), e.g. configs/test_flame20.yml.
        device: "auto" (the GPU when PyTorch sees one), "cpu", "cuda" or "cuda:N".
        opts: config overrides as test.py's --opt, e.g. ["test.numsamples=20"].
    Raises:
        ConfigError, InputError or FileNotFoundError naming the file or key that is wrong.
    """
    config = load_config(cfg, list(opts))
    return from_config(config, idrank, idgen, expgen, resolve_device(device, "device"))


def load_demo(device: str = "auto", data: str | Path | None = None) -> OferModel:
    """The bundled demo models (models/demo/) with the synthetic FLAME-format model they were trained on.

    The synthetic model and test images are made under `data` (default: the checkout's
    data/synthetic, as demo.py does) when they are not there yet, in seconds. The demo models
    know synthetic faces only: this is for trying the API, not for real photos.
    """
    from ofer.data.synthetic import SyntheticSettings, generate

    models = REPO / "models" / "demo"
    if not models.is_dir():
        raise FileNotFoundError(f"{models}: the bundled demo models are in the repository checkout; "
                                "install OFER from it with `pip install -e .`")
    data = REPO / "data" / "synthetic" if data is None else Path(data)
    flame = data / "flame"
    if not (flame / "generic_model.pkl").is_file():
        generate(data, SyntheticSettings(), training=False)
    return load(models / "idrank.tar", models / "idgen.tar", models / "expgen.tar", REPO / "configs" / "demo" / "test.yml",
                device, [f"model.flame_model_path={flame / 'generic_model.pkl'}",
                         f"model.flame_lmk_embedding_path={flame / 'landmark_embedding.npy'}",
                         f"model.front_indices_path={flame / 'frontindices.npy'}"])


__all__ = ["ImageError", "OferModel", "Result", "load", "load_demo"]
