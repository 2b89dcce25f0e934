"""The OFER pipeline: crops -> N IdGen shapes -> IdRank pick -> M ExpGen expressions -> FLAME.

It reads like the method figure (SPEC §1): encode, sample identities, rank them, sample
expressions for the chosen identity, and build the meshes. Each encoder runs once per batch;
stages whose encoders are identical (same type, attributes and weights) share the encoding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ofer.checkpoints import check_stage, checkpoint_config, is_original, load_state, read_checkpoint
from ofer.config import Config, ConfigError, TestConfig
from ofer.encoders.arcface import configure_single_image_bn
from ofer.encoders.normalise import ARCFACE_RANGE, clip_normalise_bgr, crop_to_clip_input
from ofer.flame import FLAME
from ofer.flame.jaw import jaw_limits_array, jaws_to_pose
from ofer.inference.uncertainty import vertex_spread
from ofer.io import check_values, load_array, read_image
from ofer.models.idrank import load_front_indices, rank_features
from ofer.models.stages import DiffusionStage, IdRank

log = logging.getLogger(__name__)


@dataclass
class Reconstruction:
    """Everything the pipeline produces for one image (meshes in millimetres)."""

    shapes: np.ndarray  # (N, n_shape) IdGen samples
    scores: np.ndarray  # (N,) IdRank scores
    best: int  # index of the ranked pick
    expressions: np.ndarray  # (M, n_exp) ExpGen samples
    jaws: np.ndarray  # (M, 3) sampled jaw pose (before jaw_scale)
    neutral_mm: np.ndarray  # (V, 3) best shape, neutral expression
    expression_mm: np.ndarray  # (M, V, 3) best shape with each sampled expression
    kpt68_mm: np.ndarray  # (68, 3) landmarks of the neutral mesh
    kpt7_mm: np.ndarray  # (7, 3) NoW landmarks of the neutral mesh
    shape_spread_mm: np.ndarray  # (V,) per-vertex spread of the N neutral shape samples
    expression_spread_mm: np.ndarray  # (V,) per-vertex spread of the M expressive meshes


MAX_CROP_PIXELS = 4096 * 4096  # a face crop (224 expected, others are resized); anything larger is not one


def load_inputs(image_path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one preprocessed face: the 224 crop (.jpg) and its ArcFace array (.npy beside it).

    Returns the CLIP-normalised crop (3, 224, 224) and the ArcFace input (3, 112, 112).
    Errors (InputError) name the file and what is wrong: missing, undecodable or huge image;
    non-numeric, misshapen, non-finite or out-of-range array.
    """
    image_path = Path(image_path)
    crop = read_image(image_path, max_pixels=MAX_CROP_PIXELS)
    arcface_path = image_path.with_suffix(".npy")
    return crop_tensors(crop, load_array(arcface_path, (3, 112, 112)), arcface_path)


def crop_tensors(crop_bgr: np.ndarray, arcface: np.ndarray, source: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's inputs from a decoded crop (H, W, 3) uint8 BGR and an ArcFace array (3, 112, 112).

    The array must be finite and within ARCFACE_RANGE (InputError naming `source`).
    Returns the CLIP-normalised crop (3, 224, 224) and the ArcFace input (3, 112, 112), float32.
    """
    check_values(source, arcface, *ARCFACE_RANGE)
    arcface = np.asarray(arcface, dtype=np.float32)
    return torch.from_numpy(clip_normalise_bgr(crop_to_clip_input(crop_bgr))), torch.from_numpy(arcface)


def encoder_attributes(encoder: nn.Module) -> list[tuple[str, type, dict[str, Any]]]:
    """Type and plain (non-parameter) attributes of every submodule: what, besides the
    weights, decides what an encoder computes (e.g. a switch that changes its forward)."""
    return [
        (name, type(module), {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"})
        for name, module in encoder.named_modules()
    ]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """True when two modules hold equal parameters and buffers under the same keys."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def check_settings(test: TestConfig, idgen: DiffusionStage, expgen: DiffusionStage, sources: tuple[str, str]) -> None:
    """ConfigError for sampling settings the stages would refuse, or invalid `test.jaw_limits`."""
    idgen.check_sampling(test.sampling, test.steps, "test.sampling, test.steps", f"the IdGen of {sources[0]}")
    expgen.check_sampling(test.exp_sampling, test.exp_steps, "test.exp_sampling, test.exp_steps",
                          f"the ExpGen of {sources[1]}")
    if test.jaw_limits is not None:
        try:
            jaw_limits_array(test.jaw_limits)
        except ValueError as err:
            raise ConfigError(f"config key test.jaw_limits: {err}") from None


class OferPipeline:
    """IdGen + IdRank + ExpGen + FLAME, ready to reconstruct batches of preprocessed faces."""

    def __init__(self, idgen: DiffusionStage, idrank: IdRank, expgen: DiffusionStage, flame: FLAME,
                 front_idx: torch.Tensor, test: TestConfig, jaw_scale: float, device: torch.device,
                 original: tuple[bool, bool, bool] = (False, False, False), sources: tuple[str, str, str] = ("", "", "")):
        """`original`: whether IdGen's, ExpGen's and IdRank's weights come from original OFER files
        (for `test.arcface_single_image_bn`); `sources`: their files, named in setting errors."""
        self.idgen, self.idrank, self.expgen = (m.to(device).eval() for m in (idgen, idrank, expgen))
        self.flame = flame.to(device)
        self.front_idx = front_idx.to(device)
        self.jaw_scale, self.device, self.original, self.sources = jaw_scale, device, original, sources
        self.n_exp = expgen.flame_dim - 3
        self.check_settings(test)
        self.test = test
        # Encoder pairs with equal weights, compared once; attributes are compared per call.
        encoders = [e for stage in (self.idgen, self.idrank, self.expgen) for e in (stage.farl, stage.arcface)
                    if e is not None]
        self.equal_weights = {frozenset((a, b)) for i, a in enumerate(encoders) for b in encoders[:i]
                              if type(a) is type(b) and same_weights(a, b)}

    @classmethod
    def from_checkpoints(cls, cfg: Config, idrank_path: str | Path, idgen_path: str | Path,
                         expgen_path: str | Path, device: torch.device) -> OferPipeline:
        """Build the stages from their checkpoints (original OFER files or ours).

        Our checkpoints carry their config; original files use the YAMLs named in `test.*_config`.
        FLAME assets, front-face indices and `jaw_scale` come from `cfg.model`.
        """
        stages = {}
        for name, path, fallback, slot in (("idgen", idgen_path, cfg.test.idgen_config, "--checkpoint2"),
                                           ("expgen", expgen_path, cfg.test.expgen_config, "--checkpoint3"),
                                           ("idrank", idrank_path, cfg.test.idrank_config, "--checkpoint1")):
            ckpt = read_checkpoint(path)
            check_stage(ckpt, name, path, slot)
            stage_cfg = checkpoint_config(ckpt, fallback)
            stages[name] = (stage_cfg, ckpt, path)
        idgen = DiffusionStage(stages["idgen"][0], load_weights=False)
        expgen = DiffusionStage(stages["expgen"][0], load_weights=False)
        # Settings every image would fail with are refused now, before any image (or weight) is read.
        check_settings(cfg.test, idgen, expgen, (str(idgen_path), str(expgen_path)))
        flame = FLAME(cfg.model.flame_model_path, n_shape=idgen.flame_dim, n_exp=expgen.flame_dim - 3,
                      landmark_embedding_path=cfg.model.flame_lmk_embedding_path)
        front_idx = load_front_indices(cfg.model.front_indices_path, flame.num_vertices)
        idrank = IdRank(stages["idrank"][0], shape_dim=3 * len(front_idx), load_weights=False)
        for module, (_, ckpt, path) in zip((idgen, expgen, idrank), stages.values()):
            load_state(ckpt, module, path)
        original = tuple(is_original(ckpt) for _, ckpt, _ in stages.values())
        return cls(idgen, idrank, expgen, flame, front_idx, cfg.test, cfg.model.jaw_scale, device, original,
                   (str(idgen_path), str(expgen_path), str(idrank_path)))

    def check_settings(self, test: TestConfig) -> None:
        """Refuse sampling settings (ConfigError) that every image would fail with, for these models."""
        check_settings(test, self.idgen, self.expgen, self.sources[:2])

    def _configure_encoders(self, test: TestConfig) -> None:
        """ArcFace's final BN per stage as the original ran it for these settings (`arcface_single_image_bn`).

        The original encodes IdRank's image alone, IdGen's/ExpGen's once per sample drawn.
        """
        alone = (test.numsamples == 1, test.num_expressions == 1, True)
        for stage, original, encoded_alone in zip((self.idgen, self.expgen, self.idrank), self.original, alone):
            configure_single_image_bn(stage.arcface, test.arcface_single_image_bn, original, encoded_alone)

    def encode(self, image: torch.Tensor, arcface: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The IdGen, IdRank and ExpGen contexts; each distinct encoder runs once."""
        done: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # (encoder, input, output)

        def run(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
            for other, other_x, out in done:
                if other_x is x and (other is encoder or (
                        frozenset((encoder, other)) in self.equal_weights
                        and encoder_attributes(encoder) == encoder_attributes(other))):
                    return out
            out = encoder(x)
            done.append((encoder, x, out))
            return out

        return tuple(stage.encode(image, arcface, run).float() for stage in (self.idgen, self.idrank, self.expgen))

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, arcface: torch.Tensor,
                 generator: torch.Generator | list[torch.Generator],
                 test: TestConfig | None = None) -> list[Reconstruction]:
        """image (B, 3, 224, 224) CLIP-normalised, arcface (B, 3, 112, 112) -> B reconstructions.

        `generator`: one generator, or one per image (`ofer.diffusion.noise`); each draws on its
        own device, so CPU generators give the same noise on every device. `test`: the sampling
        settings of this call (default: the pipeline's, `self.test`), checked by `check_settings`
        first. With `test.dtype = bfloat16` the encoders run under bfloat16 autocast and the
        denoisers' products in bfloat16 (`Denoiser.sampler`; ε̂ float32); IdRank and FLAME stay in float32.
        """
        t = self.test if test is None else test
        if t is not self.test:
            self.check_settings(t)
        self._configure_encoders(t)
        image, arcface = image.to(self.device), arcface.to(self.device)
        b = image.shape[0]
        dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
        with torch.autocast(self.device.type, dtype, enabled=dtype != torch.float32):
            ctx_idgen, ctx_idrank, ctx_expgen = self.encode(image, arcface)
        options = {"dtype": dtype, "cuda_graph": t.cuda_graph, "compiled": t.compile}

        # IdGen: N shape samples per image, as neutral FLAME meshes in mm.
        shapes = self.idgen.sample(ctx_idgen, t.numsamples, t.sampling, t.steps, t.eta, generator, **options)
        n = shapes.shape[1]
        meshes = self.flame(shapes.flatten(0, 1)).view(b, n, -1, 3) * 1000.0  # (B, N, V, 3)

        # IdRank: score every sample from (mean, sample - mean) on the front face; keep the best.
        scores = self.idrank.scores(rank_features(meshes, self.front_idx), ctx_idrank)  # (B, N)
        best = scores.argmax(dim=1)  # (B,)
        rows = torch.arange(b, device=self.device)  # made there: no copy from the host
        best_shape = shapes[rows, best]  # (B, n_shape)
        neutral_mm = meshes[rows, best]  # (B, V, 3): the best sample's neutral mesh

        # ExpGen: M expression + jaw samples per image, applied to the chosen identity.
        m = t.num_expressions
        exp = self.expgen.sample(ctx_expgen, m, t.exp_sampling, t.exp_steps, t.eta, generator, **options)
        expressions, jaws = exp[..., : self.n_exp], exp[..., self.n_exp :]  # (B, M, 50), (B, M, 3)
        posed_jaws = jaws_to_pose(jaws, t.jaw_limits)  # the .npz keeps the raw ones
        expression_mm = self.flame(
            best_shape.repeat_interleave(m, dim=0),
            expression=expressions.flatten(0, 1),
            jaw=self.jaw_scale * posed_jaws.flatten(0, 1),
        ).view(b, m, -1, 3) * 1000.0  # (B, M, V, 3)

        # Landmarks are linear in the vertices (no pose), so they come out in mm too.
        kpt68, kpt7 = self.flame.landmarks68(neutral_mm), self.flame.landmarks7(neutral_mm)  # (B, 68|7, 3)
        shape_spread, expression_spread = vertex_spread(meshes), vertex_spread(expression_mm)  # (B, V) each
        out = {name: value.cpu().numpy() for name, value in (
            ("shapes", shapes), ("scores", scores), ("expressions", expressions), ("jaws", jaws),
            ("neutral_mm", neutral_mm), ("expression_mm", expression_mm), ("kpt68_mm", kpt68),
            ("kpt7_mm", kpt7), ("shape_spread_mm", shape_spread), ("expression_spread_mm", expression_spread),
            ("best", best))}  # one copy per output
        return [
            Reconstruction(**{name: value[i] for name, value in out.items() if name != "best"}, best=int(out["best"][i]))
            for i in range(b)
        ]
