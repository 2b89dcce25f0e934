"""Stage-specific training logic: what a batch means, the loss, and the validation metric.

The trainer loop (`ofer.train.trainer`) is shared; each stage contributes one `Task`, an
`nn.Module` whose `forward(batch)` returns the loss (so DDP can wrap it) and whose
`validate(batch, generator)` returns named metrics, and whose `picture(batch, generator)` shows
the truth beside samples (logged to tensorboard under `picture_tag`). Batches come from `ofer.data.datasets`:
`image` (B, K, 3, 224, 224), `arcface` (B, K, 3, 112, 112) and the FLAME targets.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from ofer.checkpoints import check_stage, checkpoint_config, load_state, read_checkpoint
from ofer.config import Config
from ofer.flame import FLAME
from ofer.models.idrank import front_vertex_errors, listnet_loss, load_front_indices, rank_features
from ofer.models.stages import DiffusionStage, IdRank
from ofer.render import frontal_view, image_grid

log = logging.getLogger(__name__)

Batch = dict[str, Any]

# What each validation metric is (logged once per run); errors are mean per-vertex distances in mm.
METRIC_NOTES = {
    "val/vertex_error_mm": "one sample vs the truth (ExpGen: applied to the true identity)",
    "val/mean_face_error_mm": "the model's mean face vs the truth, the baseline a sample should beat",
    "val/neutral_face_error_mm": "the true identity with no expression vs the truth, the baseline a sample should beat",
    "val/ranked_error_mm": "IdRank's pick of the N IdGen samples vs the truth (front face, mean |dx|)",
    "val/random_error_mm": "a random one of the N samples (their mean error), the baseline the pick should beat",
    "val/oracle_error_mm": "the best of the N samples, the lower bound for the pick",
    "val/top1_accuracy": "share of images whose pick is exactly the best of the N samples",
    "val/top1_chance": "top1_accuracy of a random pick (1/N)",
}


def flatten_images(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, 3, H, W) crops -> (B*K, 3, H, W), for the 224 and the 112 crop."""
    return batch["image"].flatten(0, 1), batch["arcface"].flatten(0, 1)


def build_flame(cfg: Config, n_shape: int | None = None) -> FLAME:
    """The FLAME layer named by the config (landmarks are not needed for training)."""
    return FLAME(cfg.model.flame_model_path, n_shape=n_shape or cfg.model.n_shape, n_exp=cfg.model.n_exp)


def param_groups(module: nn.Module, cfg: Config) -> list[dict]:
    """AdamW groups with the per-module learning rates of the config (frozen parts left out)."""
    lrs = {"net": cfg.train.rank_lr if cfg.stage == "idrank" else cfg.train.diff_lr,
           "arcface": cfg.train.arcface_lr, "farl": cfg.train.farl_lr}
    groups = []
    for name, lr in lrs.items():
        part = getattr(module, name, None)
        params = [p for p in part.parameters() if p.requires_grad] if isinstance(part, nn.Module) else []
        if params:
            groups.append({"name": name, "params": params, "lr": lr})
    return groups


class DiffusionTask(nn.Module):
    """IdGen (target: shape) and ExpGen (target: 50 expression + 3 jaw)."""

    picture_tag = "val/truth_vs_sample"

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionStage(cfg)
        self.flame = build_flame(cfg)
        self.model.check_sampling(*self.validation_sampling(), "this stage's varsched")

    def validation_sampling(self) -> tuple[str, int | None, str]:
        """The sampler and step count validation samples with, and their config keys."""
        t = self.cfg.test
        if self.cfg.stage == "idgen":
            return t.sampling, t.steps, "test.sampling, test.steps"
        return t.exp_sampling, t.exp_steps, "test.exp_sampling, test.exp_steps"

    def targets(self, batch: Batch) -> torch.Tensor:
        """FLAME targets per image: (B*K, D)."""
        x0 = batch["shape"][:, : self.model.flame_dim] if self.cfg.stage == "idgen" else batch["target"]
        return x0.repeat_interleave(batch["image"].shape[1], dim=0)  # every image of an actor shares x0

    def forward(self, batch: Batch) -> torch.Tensor:
        image, arcface = flatten_images(batch)
        context = self.model.encode(image, arcface)
        return self.model.loss(context, self.targets(batch))

    def meshes_mm(self, coeffs: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        """FLAME vertices in mm from sampled/true coefficients (B, D) and shapes (B, n_shape)."""
        if self.cfg.stage == "idgen":
            return self.flame(coeffs) * 1000.0
        n_exp = self.cfg.model.n_exp
        jaw = coeffs[:, n_exp : n_exp + 3]
        return self.flame(shape, expression=coeffs[:, :n_exp], jaw=jaw) * 1000.0

    def _truth_and_sample(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Meshes (mm) of the truth, of one sample and of the baseline per image: 3 × (B*K, V, 3)."""
        image, arcface = flatten_images(batch)
        context = self.model.encode(image, arcface)
        x0 = self.targets(batch)
        shape = batch["shape"][:, : self.cfg.model.n_shape].repeat_interleave(batch["image"].shape[1], dim=0)
        sampler, steps, _ = self.validation_sampling()
        samples = self.model.sample(context, 1, sampler, steps, self.cfg.test.eta, generator)[:, 0]
        return self.meshes_mm(x0, shape), self.meshes_mm(samples, shape), self.meshes_mm(torch.zeros_like(x0), shape)

    @torch.no_grad()
    def validate(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        """Mean vertex error (mm) of sampled FLAME meshes vs ground truth, and of a trivial baseline.

        IdGen's baseline is the model's mean face (zero coefficients), ExpGen's the neutral
        face of the true identity (zero expression and jaw); see METRIC_NOTES.
        """
        truth, sample, base = self._truth_and_sample(batch, generator)
        baseline = "val/mean_face_error_mm" if self.cfg.stage == "idgen" else "val/neutral_face_error_mm"
        return {
            "val/vertex_error_mm": (sample - truth).norm(dim=-1).mean().item(),
            baseline: (base - truth).norm(dim=-1).mean().item(),
        }

    @torch.no_grad()
    def picture(self, batch: Batch, generator: torch.Generator, count: int = 4) -> np.ndarray:
        """Rows of [truth | sample] frontal renderings for the first images, (H, W, 3) BGR."""
        truth, sample, _ = self._truth_and_sample(batch, generator)
        faces = self.flame.faces.cpu().numpy()
        tiles = []
        for i in range(min(count, len(truth))):
            tiles += [frontal_view(truth[i].cpu().numpy(), faces), frontal_view(sample[i].cpu().numpy(), faces)]
        return image_grid(tiles, ncols=2, labels=["truth", "sample"] * (len(tiles) // 2))


class IdRankTask(nn.Module):
    """IdRank: a frozen IdGen proposes N shapes per image; the ranker learns ListNet targets."""

    picture_tag = "val/truth_vs_ranked_samples"

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.idgen = self._frozen_idgen(cfg)
        self.idgen.check_sampling(cfg.idrank.sampling, cfg.idrank.steps, "idrank.sampling, idrank.steps",
                                  f"the IdGen of {cfg.idrank.idgen_checkpoint}")
        self.flame = build_flame(cfg, n_shape=self.idgen.flame_dim)  # the shapes IdGen samples
        front_idx = load_front_indices(cfg.model.front_indices_path, self.flame.num_vertices)
        self.register_buffer("front_idx", front_idx, persistent=False)
        self.model = IdRank(cfg, shape_dim=3 * len(self.front_idx))

    @staticmethod
    def _frozen_idgen(cfg: Config) -> DiffusionStage:
        """Build IdGen from the config saved in its checkpoint (else `idrank.idgen_config`), frozen."""
        path = cfg.idrank.idgen_checkpoint
        ckpt = read_checkpoint(path)
        check_stage(ckpt, "idgen", path, "idrank.idgen_checkpoint")
        idgen = DiffusionStage(checkpoint_config(ckpt, cfg.idrank.idgen_config), load_weights=False)
        load_state(ckpt, idgen, path)
        idgen.requires_grad_(False).eval()
        return idgen

    def sample_meshes(self, image: torch.Tensor, arcface: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """N IdGen shape samples per image as neutral FLAME meshes in mm: (B, N, V, 3)."""
        r = self.cfg.idrank
        with torch.no_grad():
            context = self.idgen.encode(image, arcface)
            shapes = self.idgen.sample(context, r.numsamples, r.sampling, r.steps, generator=generator)  # (B, N, D)
            b, n, _ = shapes.shape
            verts = self.flame(shapes.flatten(0, 1)) * 1000.0  # (B*N, V, 3)
        return verts.view(b, n, -1, 3)

    def _ranking(self, batch: Batch, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled meshes (B*K, N, V, 3) and true meshes (B*K, V, 3) in mm, the ranker's scores and the
        samples' front-face errors (mm), both (B*K, N)."""
        image, arcface = flatten_images(batch)
        k = batch["image"].shape[1]
        meshes = self.sample_meshes(image, arcface, generator)  # (B*K, N, V, 3)
        shape = batch["shape"][:, : self.idgen.flame_dim].repeat_interleave(k, dim=0)
        with torch.no_grad():
            truth = self.flame(shape) * 1000.0  # (B*K, V, 3)
        errors = front_vertex_errors(meshes, truth, self.front_idx)  # (B*K, N)
        features = rank_features(meshes, self.front_idx)  # (B*K, N, 2*shape_dim)
        scores = self.model.scores(features, self.model.encode(image, arcface))
        return meshes, truth, scores, errors

    def forward(self, batch: Batch) -> torch.Tensor:
        _, _, scores, errors = self._ranking(batch)
        return listnet_loss(scores, errors)

    @torch.no_grad()
    def validate(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        """Error of the ranked pick vs a random sample vs the oracle best sample (mm)."""
        _, _, scores, errors = self._ranking(batch, generator)
        pick = errors.gather(1, scores.argmax(dim=1, keepdim=True)).mean()
        return {
            "val/ranked_error_mm": pick.item(),
            "val/random_error_mm": errors.mean().item(),
            "val/oracle_error_mm": errors.min(dim=1).values.mean().item(),
            "val/top1_accuracy": (scores.argmax(1) == errors.argmin(1)).float().mean().item(),
            "val/top1_chance": 1.0 / errors.shape[1],
        }

    @torch.no_grad()
    def picture(self, batch: Batch, generator: torch.Generator, count: int = 4, shown: int = 8) -> np.ndarray:
        """Rows of [truth | the N samples by falling score] for the first images, (H, W, 3) BGR.

        Of more than `shown` samples, `shown` spread evenly over the ranking are drawn (the first and
        the last included). Each is labelled with its rank, its ListNet probability (the softmax of
        the scores) and its front-face error in mm, so a good ranker's errors grow along the row.
        """
        meshes, truth, scores, errors = self._ranking(batch, generator)
        n = scores.shape[1]
        ranks = np.unique(np.linspace(0, n - 1, min(n, shown)).round().astype(int))  # positions in the ranking
        order = scores.argsort(dim=1, descending=True).cpu()  # (B*K, N) sample indices, best first
        probs, errors = scores.softmax(dim=1).cpu(), errors.cpu()
        faces = self.flame.faces.cpu().numpy()
        tiles, labels = [], []
        for i in range(min(count, len(truth))):
            tiles.append(frontal_view(truth[i].cpu().numpy(), faces))
            labels.append("truth")
            for rank in ranks:
                j = order[i, rank]
                tiles.append(frontal_view(meshes[i, j].cpu().numpy(), faces))
                labels.append(f"#{rank + 1} p={probs[i, j]:.2f} {errors[i, j]:.1f}mm")
        return image_grid(tiles, ncols=1 + len(ranks), labels=labels)


def build_task(cfg: Config) -> nn.Module:
    """The task object of the configured stage."""
    return IdRankTask(cfg) if cfg.stage == "idrank" else DiffusionTask(cfg)
