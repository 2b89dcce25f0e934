"""IdRank: scores IdGen's shape samples so one consistent identity can be picked.

Each sample is described by the mean front-face mesh of all N samples and its own deviation
from that mean (`rank_features`); a stack of context-modulated ScaleShift layers maps it to a
score, conditioned on the image code c = [FaRL f, ArcFace a]. Training matches the softmax of
the scores to the softmax of the negative per-sample errors (ListNet, `listnet_loss`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ofer.io import InputError, load_array

IDRANK_HIDDEN_DIMS = (4096, 1024, 256, 64)


class ScaleShift(nn.Module):
    """h = Linear(x); [h = GroupNorm(8)(SELU(h))]; out = h * sigmoid(scale(c)) + shift(c)."""

    def __init__(self, dim_in: int, dim_out: int, context_dim: int, normalise: bool) -> None:
        super().__init__()
        self.mlp = nn.Linear(dim_in, dim_out)
        self.scale = nn.Linear(context_dim, dim_out)
        self.shift = nn.Linear(context_dim, dim_out, bias=False)
        self.gn = nn.GroupNorm(8, dim_out) if normalise else None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim_in), context (B, C) shared by the N samples -> (B, N, dim_out)."""
        h = self.mlp(x)  # (B, N, dim_out)
        if self.gn is not None:
            batch, samples, width = h.shape
            h = self.gn(F.selu(h).reshape(batch * samples, width)).reshape(batch, samples, width)
        scale = torch.sigmoid(self.scale(context))[:, None, :]  # (B, 1, dim_out)
        shift = self.shift(context)[:, None, :]  # (B, 1, dim_out)
        return h * scale + shift


class IdRankNet(nn.Module):
    """Five ScaleShift layers 2*shape_dim -> 4096 -> 1024 -> 256 -> 64 -> 1 giving one score per sample.

    With the defaults (shape_dim 5355 = 1785 front vertices x 3, context 1024) the state dict
    matches the original `ranklayers.{i}.mlp|scale|shift|gn` layout, 59,505,986 parameters.
    `hidden_dims` (config `net.hidden_dims`) narrows it for the demo and for tests; every hidden
    width must be divisible by 8.
    """

    def __init__(
        self, shape_dim: int = 5355, context_dim: int = 1024, hidden_dims: Sequence[int] = IDRANK_HIDDEN_DIMS
    ) -> None:
        super().__init__()
        self.shape_dim = shape_dim
        self.context_dim = context_dim
        widths = [2 * shape_dim, *hidden_dims, 1]
        last = len(widths) - 2
        self.ranklayers = nn.ModuleList(
            ScaleShift(dim_in, dim_out, context_dim, normalise=i < last)
            for i, (dim_in, dim_out) in enumerate(pairwise(widths))
        )

    def forward(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Score the N samples of each image.

        Args:
            features: (B, N, 2*shape_dim) from `rank_features`.
            context: (B, context_dim) image code [FaRL, ArcFace].
        Returns:
            (B, N) scores; softmax over N gives the ranking distribution.
        """
        if features.dim() != 3 or features.shape[-1] != 2 * self.shape_dim:
            raise ValueError(f"IdRankNet expects features (B, N, {2 * self.shape_dim}), got {tuple(features.shape)}")
        if context.shape != (features.shape[0], self.context_dim):
            raise ValueError(
                f"IdRankNet expects context ({features.shape[0]}, {self.context_dim}), got {tuple(context.shape)}"
            )
        h = features
        for layer in self.ranklayers:
            h = layer(h, context)
        return h.squeeze(-1)  # (B, N, 1) -> (B, N)


def load_front_indices(path: str | os.PathLike, num_vertices: int) -> torch.Tensor:
    """The front-face vertex indices IdRank uses (1785 for FLAME, `frontindices.npy`) as (K,) long.

    The file must hold a non-empty list of whole numbers in [0, num_vertices) of the FLAME model
    in use; anything else is an InputError naming the file (checked at start-up, not mid-run).
    """
    array = load_array(path, (None,))  # the file, a plain .npy, numeric (not a bool mask), 1-D: load_array says what is wrong
    if array.size == 0:
        raise InputError(f"{path}: no front-face vertex indices (empty array)")
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise InputError(f"{path}: vertex indices must be whole numbers")
    if array.min() < 0 or array.max() >= num_vertices:
        raise InputError(f"{path}: vertex indices span [{array.min():g}, {array.max():g}], outside [0, {num_vertices}) "
                         f"of the FLAME model in use (indices for another topology?)")
    return torch.from_numpy(array.astype(np.int64))


def rank_features(meshes_mm: torch.Tensor, front_idx: torch.Tensor) -> torch.Tensor:
    """IdRank input: per sample, concat(mean front mesh, sample - mean) flattened, mean first.

    Args:
        meshes_mm: (B, N, V, 3) the N shape samples of each image as meshes in millimetres.
        front_idx: (K,) long indices of the front-face vertices.
    Returns:
        (B, N, 2*3K) features; the first 3K numbers are the same for every sample of an image.
    """
    front = meshes_mm[:, :, front_idx]  # (B, N, K, 3)
    mean = front.mean(dim=1, keepdim=True)  # (B, 1, K, 3)
    deviation = (front - mean).flatten(2)  # (B, N, 3K)
    return torch.cat([mean.flatten(2).expand_as(deviation), deviation], dim=-1)  # (B, N, 6K)


def front_vertex_errors(pred_mm: torch.Tensor, gt_mm: torch.Tensor, front_idx: torch.Tensor) -> torch.Tensor:
    """Mean absolute error (mm) of each sample against the ground truth on the front vertices.

    Args:
        pred_mm: (B, N, V, 3) sample meshes in millimetres.
        gt_mm: (B, V, 3) ground-truth meshes in millimetres.
        front_idx: (K,) long front-face vertex indices.
    Returns:
        (B, N): mean over the K vertices and the 3 coordinates of |pred - gt|.
    """
    diff = pred_mm[:, :, front_idx] - gt_mm[:, None, front_idx]  # (B, N, K, 3)
    return diff.abs().mean(dim=(-2, -1))


def listnet_loss(scores: torch.Tensor, errors_mm: torch.Tensor) -> torch.Tensor:
    """ListNet loss: cross-entropy from softmax(-errors) (target) to softmax(scores).

    Args:
        scores: (B, N) IdRankNet outputs.
        errors_mm: (B, N) per-sample errors; lower error -> higher target probability. Treated
            as a fixed target (no gradient flows into it).
    Returns:
        Scalar: -sum_n target_n * log_softmax(scores)_n, averaged over B.
    """
    if scores.shape != errors_mm.shape or scores.dim() != 2:
        raise ValueError(
            f"listnet_loss expects scores and errors of equal shape (B, N), "
            f"got {tuple(scores.shape)} and {tuple(errors_mm.shape)}"
        )
    target = torch.softmax(-errors_mm.detach(), dim=1)
    return -(target * torch.log_softmax(scores, dim=1)).sum(dim=1).mean()
