"""Geometry for evaluation: similarity transforms, Procrustes, point-to-surface distance, alignment.

The NoW protocol (SPEC §12) aligns a predicted mesh to a scan and measures, for every scan
vertex, the distance to the closest point on the mesh *surface*. This module holds the pieces:

- `Similarity`: x -> s·R·x + t, applied to (N, 3) point arrays.
- `similarity_procrustes`: closed-form least-squares fit between corresponding points
  (Umeyama 1991), with or without scale, optionally allowing reflections.
- `point_triangle_distance`: the exact distance from points to triangles (plane, edges,
  vertices), vectorised numpy; used to verify the library query on hand-built cases.
- `MeshSurface`: closest points on a triangle mesh via `trimesh.proximity` (rtree-accelerated).
- `refine_dogleg`: the NoW reference refinement (SPEC §12): Powell's dogleg over (s, axis-angle r,
  t) of x -> s·R(r)·x + t (rotation about the origin), stopping when a step improves the sum of
  squared point-to-surface distances by less than 1e-4 of it, or after 200 steps.
- `refine_similarity`: our alternative, Levenberg–Marquardt over (log s, rotation, translation)
  about the data's centroid, run on to a relative gain of 1e-6.
Both recompute closest points at every evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import trimesh
from scipy.spatial.transform import Rotation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Similarity:
    """The map x -> scale · rotation · x + translation (rotation (3, 3), translation (3,))."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    @staticmethod
    def identity() -> Similarity:
        return Similarity(1.0, np.eye(3), np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform points (N, 3) -> (N, 3)."""
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def inverse_apply(self, points: np.ndarray) -> np.ndarray:
        """Apply the inverse map to points (N, 3) -> (N, 3); rotation is orthogonal, so R⁻¹ = Rᵀ."""
        return (np.asarray(points, dtype=np.float64) - self.translation) @ self.rotation / self.scale

    def then(self, outer: Similarity) -> Similarity:
        """The composition `outer ∘ self` (apply self first)."""
        return Similarity(
            outer.scale * self.scale,
            outer.rotation @ self.rotation,
            outer.scale * outer.rotation @ self.translation + outer.translation,
        )


def similarity_procrustes(
    source: np.ndarray,
    target: np.ndarray,
    with_scale: bool = True,
    allow_reflection: bool = False,
) -> Similarity:
    """Least-squares similarity T minimising Σ‖T(source_i) − target_i‖² (Umeyama's closed form).

    source, target: (N, 3) corresponding points, N ≥ 3. `with_scale=False` fixes s = 1 (rigid).
    `allow_reflection=True` keeps the plain SVD solution U·Vᵀ even when det = −1, as the NoW
    reference evaluation does; otherwise the last singular direction is flipped so that the
    result is a proper rotation.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 3 or len(source) < 3:
        raise ValueError(f"Procrustes needs two (N>=3, 3) arrays of equal shape, got {source.shape} and {target.shape}")
    mu_s, mu_t = source.mean(0), target.mean(0)
    xs, xt = source - mu_s, target - mu_t  # (N, 3) centred
    cov = xt.T @ xs / len(source)  # (3, 3) cross-covariance target × source
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(3)
    if not allow_reflection and np.linalg.det(u) * np.linalg.det(vt) < 0:
        signs[2] = -1.0
    rotation = u @ np.diag(signs) @ vt
    scale = float((sing * signs).sum() / (xs**2).sum(1).mean()) if with_scale else 1.0
    return Similarity(scale, rotation, mu_t - scale * rotation @ mu_s)


def closest_point_on_segment(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Closest points on segments [a, b] to points; all arrays broadcast to (..., 3)."""
    ab = b - a
    length2 = (ab * ab).sum(-1, keepdims=True)
    # A zero-length segment is the point a: ab = 0 makes the parameter irrelevant.
    along = ((points - a) * ab).sum(-1, keepdims=True) / np.where(length2 > 0, length2, 1.0)
    return a + np.clip(along, 0.0, 1.0) * ab


def point_triangle_distance(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance from points to filled triangles.

    points: (P, 3); triangles: (3, 3) (one triangle for all points) or (P, 3, 3) (one per
    point). Returns (P,). The closest point is either the orthogonal projection onto the
    triangle's plane, when it falls inside the triangle, or lies on one of the three edges
    (vertices are edge end points), so the distance is the minimum over those candidates.
    Degenerate (zero-area) triangles reduce to their edges.
    """
    points = np.asarray(points, dtype=np.float64)
    tri = np.broadcast_to(np.asarray(triangles, dtype=np.float64), points.shape[:-1] + (3, 3))
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]  # (P, 3) each
    edge_dist = np.stack(
        [np.linalg.norm(points - closest_point_on_segment(points, p, q), axis=-1)
         for p, q in ((a, b), (b, c), (c, a))],
        axis=-1,
    ).min(-1)  # (P,)
    normal = np.cross(b - a, c - a)  # (P, 3), length = 2·area
    length = np.linalg.norm(normal, axis=-1, keepdims=True)  # (P, 1)
    unit = normal / np.where(length > 0, length, 1.0)
    height = ((points - a) * unit).sum(-1)  # (P,) signed distance to the plane
    foot = points - height[..., None] * unit  # (P, 3) projection onto the plane
    inside = length[..., 0] > 0
    for p, q in ((a, b), (b, c), (c, a)):
        inside &= (np.cross(q - p, foot - p) * normal).sum(-1) >= 0
    return np.where(inside, np.minimum(np.abs(height), edge_dist), edge_dist)


class MeshSurface:
    """Closest-point queries on a fixed triangle mesh (trimesh + rtree; the tree is built once).

    vertices: (V, 3), faces: (F, 3) int.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        self.mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces), process=False)

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """points (P, 3) -> closest surface points (P, 3), distances (P,), triangle ids (P,)."""
        closest, distance, triangle = trimesh.proximity.closest_point(self.mesh, np.asarray(points, dtype=np.float64))
        return closest, distance, triangle


@dataclass(frozen=True)
class _Fit:
    """One evaluation of the alignment objective at params = (log s, R, t)."""

    params: tuple[float, np.ndarray, np.ndarray]
    transform: Similarity
    closest: np.ndarray  # (P, 3) closest points on the untransformed surface
    distances: np.ndarray  # (P,) point-to-surface distances in the target frame
    triangles: np.ndarray  # (P,) index of the triangle holding each closest point

    @property
    def energy(self) -> float:
        return float((self.distances**2).sum())


@dataclass(frozen=True)
class Refinement:
    """Result of `refine_similarity`: the transform, the final distances (P,) and the effort."""

    transform: Similarity
    distances: np.ndarray
    iterations: int
    evaluations: int


def refine_similarity(
    surface: MeshSurface,
    targets: np.ndarray,
    with_scale: bool = True,
    max_iterations: int = 50,
    tolerance: float = 1e-6,
) -> Refinement:
    """Find T = (s, R, t) minimising Σ_i dist(targets_i, T(surface))², starting from identity.

    targets: (P, 3) points (the cropped scan). Distances are exact point-to-surface distances,
    with closest points recomputed at every evaluation. The optimiser is Levenberg–Marquardt on
    the distances: with the closest point c_i held fixed, d_i = ‖T(c_i) − q_i‖ has the gradient
    n_iᵀ ∂T(c_i)/∂θ (n_i the unit vector from q_i to its closest point), which is the true
    gradient of the distance (envelope theorem) — for points over a face's interior this is the
    point-to-plane linearisation of ICP. A step is kept only if the total squared distance goes
    down, so the objective decreases monotonically. The loop stops when the quadratic model
    promises, or a kept step gains, less than `tolerance` of the energy, when distances reach
    floating-point noise, or after `max_iterations` kept steps.

    Parametrisation: T(x) = s·R·(x − μ) + μ + t with μ the target centroid (rotation about
    the data keeps rotation and translation decoupled). Updates: s ← s·exp(δs),
    R ← exp([δω]×)·R, t ← t + δt. `with_scale=False` keeps s = 1 (metrical track).

    Distances to T(surface) are computed as s · dist(T⁻¹(q), surface), which is exact for a
    similarity and reuses the spatial index of the untransformed mesh.
    """
    targets = np.asarray(targets, dtype=np.float64)
    mu = targets.mean(0)
    noise_energy = len(targets) * (1e-10 * max(float(np.abs(targets - mu).max()), 1.0)) ** 2
    face_normals = surface.mesh.face_normals  # (F, 3), direction used where a distance is 0

    def transform(log_s: float, rotation: np.ndarray, shift: np.ndarray) -> Similarity:
        s = float(np.exp(log_s))
        return Similarity(s, rotation, mu + shift - s * rotation @ mu)

    def evaluate(params: tuple[float, np.ndarray, np.ndarray]) -> _Fit:
        t = transform(*params)
        closest, dist, tri = surface.closest(t.inverse_apply(targets))
        return _Fit(params, t, closest, t.scale * dist, tri)  # distances in the target frame

    state = evaluate((0.0, np.eye(3), np.zeros(3)))
    damping, evaluations, iteration = 1e-4, 1, 0
    while iteration < max_iterations and state.energy > noise_energy:
        t = state.transform
        arm = t.scale * (state.closest - mu) @ t.rotation.T  # (P, 3) = T(c) − μ − t
        offset = t.apply(state.closest) - targets  # (P, 3), ‖offset‖ = dist
        zero = state.distances <= 0
        direction = np.where(zero[:, None], face_normals[state.triangles] @ t.rotation.T,
                             offset / np.where(zero, 1.0, state.distances)[:, None])  # (P, 3) unit
        columns = [np.cross(arm, direction), direction]  # ∂d/∂δω (P, 3), ∂d/∂δt (P, 3)
        if with_scale:
            columns.insert(0, (arm * direction).sum(1, keepdims=True))  # ∂d/∂δs (P, 1)
        jac = np.concatenate(columns, axis=1)  # (P, 7) or (P, 6)
        hessian = jac.T @ jac
        gradient = jac.T @ state.distances
        scaling = np.diag(np.maximum(np.diag(hessian), 1e-12 * np.diag(hessian).max()))
        candidate = None
        while damping < 1e12:
            step = np.linalg.lstsq(hessian + damping * scaling, -gradient, rcond=None)[0]
            model_gain = -(2.0 * gradient @ step + step @ hessian @ step)
            if model_gain <= tolerance * state.energy:
                break
            if not with_scale:
                step = np.concatenate([[0.0], step])
            log_s, rotation, shift = state.params
            trial = evaluate((log_s + step[0], Rotation.from_rotvec(step[1:4]).as_matrix() @ rotation,
                              shift + step[4:7]))
            evaluations += 1
            if trial.energy < state.energy:
                candidate = trial
                break
            damping *= 10.0
        if candidate is None:
            break
        iteration += 1
        gain = state.energy - candidate.energy
        state, damping = candidate, max(damping / 10.0, 1e-12)
        if gain <= tolerance * (state.energy + gain):
            break
    if iteration == max_iterations:
        logger.warning("refine_similarity stopped at max_iterations=%d before converging", max_iterations)
    logger.debug("refine_similarity: %d steps, %d evaluations, energy %.6g",
                 iteration, evaluations, state.energy)
    return Refinement(state.transform, state.distances, iteration, evaluations)


# The reference's solver settings (chumpy's dogleg as the NoW evaluation calls it): initial trust
# radius 0.1, stop when an accepted step gains less than 1e-4 of the sum of squares, at most 200
# steps; gradient and step-size floors 1e-15.
DOGLEG_INITIAL_RADIUS = 0.1
DOGLEG_RELATIVE_GAIN = 1e-4
DOGLEG_MAX_STEPS = 200
DOGLEG_FLOOR = 1e-15


def rotation_jacobian(rotvec: np.ndarray, points: np.ndarray) -> np.ndarray:
    """∂(R(r)·c)/∂r for an axis-angle r and points c (P, 3) -> (P, 3, 3) [point, coordinate, r_j].

    Closed form of Gallego & Yezzi (2015): −R·[c]×·(r·rᵀ + (Rᵀ − I)·[r]×)/‖r‖², and −[c]× at r = 0.
    """
    theta2 = float(rotvec @ rotvec)
    rotation = Rotation.from_rotvec(rotvec).as_matrix()
    if theta2 < 1e-24:
        mix = np.eye(3)
    else:
        skew_r = np.array([[0.0, -rotvec[2], rotvec[1]], [rotvec[2], 0.0, -rotvec[0]], [-rotvec[1], rotvec[0], 0.0]])
        mix = (np.outer(rotvec, rotvec) + (rotation.T - np.eye(3)) @ skew_r) / theta2
    columns = np.cross(points[:, None, :], mix.T[None, :, :])  # (P, j, 3): c × mix[:, j]
    return -np.einsum("ik,pjk->pij", rotation, columns)  # (P, 3, 3)


def refine_dogleg(
    surface: MeshSurface,
    targets: np.ndarray,
    with_scale: bool = True,
    max_steps: int = DOGLEG_MAX_STEPS,
    relative_gain: float = DOGLEG_RELATIVE_GAIN,
) -> Refinement:
    """Find T(x) = s·R(r)·x + t minimising Σ_i dist(targets_i, T(surface))² as the NoW reference does.

    targets: (P, 3) points (the cropped scan); T starts at the identity and rotates about the
    origin. Residuals are the P point-to-surface distances; their Jacobian holds each closest
    point at its place on its triangle. Powell's dogleg (Lourakis & Argyros 2005) with the
    reference settings above: per step, the Cauchy step cut to the trust radius, else the
    Gauss–Newton step if it fits, else the point on the segment between them at the radius; a
    trial that does not lower the sum of squares shrinks the radius and is retried.
    `with_scale=False` fixes s = 1 and optimises (r, t) only (metrical track).

    The scale stays positive: a trial step taking it to zero or below is refused as one that
    does not lower the sum. (The reference adds the penalty 100·(|s| − s) instead, which lets a
    step cross zero: on a one-triangle mesh, or a mesh far larger than its landmarks, the scale
    ended negative and so did the "distances" s·d. For s > 0 the penalty is zero, so the two
    agree whenever the reference's scale stays positive.)
    """
    targets = np.asarray(targets, dtype=np.float64)

    def unpack(params: np.ndarray) -> Similarity:
        scale = float(params[0]) if with_scale else 1.0
        rotvec, shift = params[-6:-3], params[-3:]
        return Similarity(scale, Rotation.from_rotvec(rotvec).as_matrix(), shift)

    def residuals(params: np.ndarray) -> tuple[np.ndarray, np.ndarray, Similarity]:
        t = unpack(params)
        closest, dist, _ = surface.closest(t.inverse_apply(targets))
        return t.scale * dist, closest, t  # distances in the target frame

    def jacobian(params: np.ndarray, res: np.ndarray, closest: np.ndarray, t: Similarity) -> np.ndarray:
        offset = t.apply(closest) - targets  # (P, 3), ‖offset‖ = res
        unit = offset / np.where(res > 0, res, 1.0)[:, None]  # (P, 3); zero rows where res = 0
        d_rot = t.scale * np.einsum("pi,pij->pj", unit, rotation_jacobian(params[-6:-3], closest))  # (P, 3)
        columns = [d_rot, unit]
        if with_scale:
            columns.insert(0, (unit * (closest @ t.rotation.T)).sum(1, keepdims=True))  # ∂d/∂s (P, 1)
        return np.concatenate(columns, axis=1)  # (P, 7) or (P, 6)

    params = np.concatenate([[1.0] if with_scale else [], np.zeros(6)])
    res, closest, t = residuals(params)
    jac = jacobian(params, res, closest, t)
    radius, steps, evaluations = DOGLEG_INITIAL_RADIUS, 0, 1
    descent = jac.T @ -res  # minus the half-gradient of the sum of squares
    stop = np.abs(descent).max() < DOGLEG_FLOOR
    while not stop and steps < max_steps:
        steps += 1
        cauchy = (descent @ descent) / np.sum((jac @ descent) ** 2) * descent
        gauss_newton = None
        while True:
            if np.linalg.norm(cauchy) >= radius:
                step = radius / np.linalg.norm(cauchy) * cauchy
            else:
                if gauss_newton is None:
                    gauss_newton = np.linalg.lstsq(jac.T @ jac, descent, rcond=None)[0]
                if np.linalg.norm(gauss_newton) <= radius:
                    step = gauss_newton
                else:  # the point of the segment cauchy -> gauss_newton at distance `radius`
                    between = gauss_newton - cauchy
                    a, b, c = between @ between, cauchy @ between, cauchy @ cauchy - radius**2
                    step = cauchy + (-b + np.sqrt(b * b - a * c)) / a * between
            if np.linalg.norm(step) <= DOGLEG_FLOOR * np.linalg.norm(params):
                stop = True
                break
            trial = params + step
            improved, ratio = False, -1.0  # a step taking the scale to zero or below fails
            if not with_scale or trial[0] > 0:
                trial_res, trial_closest, trial_t = residuals(trial)
                evaluations += 1
                energy, trial_energy = float(res @ res), float(trial_res @ trial_res)
                gain = energy - trial_energy
                predicted = energy - float(np.sum((res + jac @ step) ** 2))
                ratio = gain / predicted if gain > 0 else gain
                improved = gain > 0
            if improved:
                params, res, closest, t = trial, trial_res, trial_closest, trial_t
                if gain / energy < relative_gain:
                    stop = True
                else:
                    jac = jacobian(params, res, closest, t)
                    descent = jac.T @ -res
                    stop = np.abs(descent).max() < DOGLEG_FLOOR
            if ratio > 0.9:
                radius = max(radius, 2.5 * np.linalg.norm(step))
            elif ratio < 0.05:
                radius *= 0.25
            if radius <= DOGLEG_FLOOR * np.linalg.norm(params):
                stop = True
            if stop or improved:
                break
    logger.debug("refine_dogleg: %d steps, %d evaluations, energy %.6g", steps, evaluations, float(res @ res))
    return Refinement(t, res, steps, evaluations)
