"""The OFER pipeline: crops -> N IdGen shapes -> IdRank pick -> M ExpGen expressions -> FLAME.

It reads like the method figure (SPEC §1): encode, sample identities, rank them, sample
expressions for the chosen identity, and build the meshes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ofer.checkpoints import check_stage, checkpoint_config, is_original, load_state, read_checkpoint
from ofer.config import Config, TestConfig
from ofer.encoders.arcface import configure_single_image_bn
from ofer.encoders.normalise import clip_normalise_bgr, crop_to_clip_input
from ofer.flame import FLAME
from ofer.io import load_array, read_image
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


# The ArcFace input is (pixel - 127.5) / 127.5, within [-1, 1]; the margin allows resampling
# and float16 rounding but catches 0-255 pixels or other normalisations.
ARCFACE_RANGE = (-1.05, 1.05)
MAX_CROP_PIXELS = 4096 * 4096  # a face crop (224 expected, others are resized); anything larger is not one


def load_inputs(image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check one preprocessed face: the 224 crop (.jpg) and its ArcFace array (.npy beside it).

    Returns the CLIP-normalised crop (3, 224, 224) and the ArcFace input (3, 112, 112).
    Errors (InputError) name the file and what is wrong: missing, undecodable or huge image;
    non-numeric, misshapen, non-finite or out-of-range array.
    """
    crop = read_image(image_path, max_pixels=MAX_CROP_PIXELS)
    arcface = load_array(image_path.with_suffix(".npy"), (3, 112, 112), ARCFACE_RANGE).astype(np.float32)
    return torch.from_numpy(clip_normalise_bgr(crop_to_clip_input(crop))), torch.from_numpy(arcface)


class OferPipeline:
    """IdGen + IdRank + ExpGen + FLAME, ready to reconstruct batches of preprocessed faces."""

    def __init__(self, idgen: DiffusionStage, idrank: IdRank, expgen: DiffusionStage, flame: FLAME,
                 front_idx: torch.Tensor, test: TestConfig, jaw_scale: float, device: torch.device):
        self.idgen, self.idrank, self.expgen = (m.to(device).eval() for m in (idgen, idrank, expgen))
        self.flame = flame.to(device)
        self.front_idx = front_idx.to(device)
        self.test, self.jaw_scale, self.device = test, jaw_scale, device
        self.n_exp = expgen.flame_dim - 3

    @classmethod
    def from_checkpoints(cls, cfg: Config, idrank_path: str | Path, idgen_path: str | Path,
                         expgen_path: str | Path, device: torch.device) -> "OferPipeline":
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
        flame = FLAME(cfg.model.flame_model_path, n_shape=idgen.flame_dim, n_exp=expgen.flame_dim - 3,
                      landmark_embedding_path=cfg.model.flame_lmk_embedding_path)
        front_idx = load_front_indices(cfg.model.front_indices_path, flame.num_vertices)
        idrank = IdRank(stages["idrank"][0], shape_dim=3 * len(front_idx), load_weights=False)
        # The original encodes IdRank's image alone, IdGen's/ExpGen's once per sample drawn.
        alone = (cfg.test.numsamples == 1, cfg.test.num_expressions == 1, True)
        for module, (_, ckpt, path), encoded_alone in zip((idgen, expgen, idrank), stages.values(), alone):
            load_state(ckpt, module, path)
            configure_single_image_bn(module.arcface, cfg.test.arcface_single_image_bn, is_original(ckpt),
                                      encoded_alone)
        return cls(idgen, idrank, expgen, flame, front_idx, cfg.test, cfg.model.jaw_scale, device)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, arcface: torch.Tensor, generator: torch.Generator) -> list[Reconstruction]:
        """image (B, 3, 224, 224) CLIP-normalised, arcface (B, 3, 112, 112) -> B reconstructions."""
        t = self.test
        image, arcface = image.to(self.device), arcface.to(self.device)
        b = image.shape[0]

        # IdGen: N shape samples per image, as neutral FLAME meshes in mm.
        shapes = self.idgen.sample(self.idgen.encode(image, arcface), t.numsamples, t.sampling, t.steps, t.eta,
                                   generator)
        n = shapes.shape[1]
        meshes = self.flame(shapes.flatten(0, 1)).view(b, n, -1, 3) * 1000.0  # (B, N, V, 3)

        # IdRank: score every sample from (mean, sample - mean) on the front face; keep the best.
        scores = self.idrank.scores(rank_features(meshes, self.front_idx), self.idrank.encode(image, arcface))  # (B, N)
        best = scores.argmax(dim=1)  # (B,)
        best_shape = shapes[torch.arange(b), best]  # (B, n_shape)

        # ExpGen: M expression + jaw samples per image, applied to the chosen identity.
        m = t.num_expressions
        exp = self.expgen.sample(self.expgen.encode(image, arcface), m, t.exp_sampling, t.exp_steps, t.eta,
                                 generator)
        expressions, jaws = exp[..., : self.n_exp], exp[..., self.n_exp :]  # (B, M, 50), (B, M, 3)
        expression_mm = self.flame(
            best_shape.repeat_interleave(m, dim=0),
            expression=expressions.flatten(0, 1),
            jaw=self.jaw_scale * jaws.flatten(0, 1),
        ).view(b, m, -1, 3) * 1000.0  # (B, M, V, 3)

        neutral = self.flame(best_shape)  # (B, V, 3) metres
        kpt68 = self.flame.landmarks68(neutral) * 1000.0
        kpt7 = self.flame.landmarks7(neutral) * 1000.0
        neutral_mm = neutral * 1000.0

        return [
            Reconstruction(
                shapes=shapes[i].cpu().numpy(), scores=scores[i].cpu().numpy(), best=int(best[i]),
                expressions=expressions[i].cpu().numpy(), jaws=jaws[i].cpu().numpy(),
                neutral_mm=neutral_mm[i].cpu().numpy(), expression_mm=expression_mm[i].cpu().numpy(),
                kpt68_mm=kpt68[i].cpu().numpy(), kpt7_mm=kpt7[i].cpu().numpy(),
            )
            for i in range(b)
        ]
