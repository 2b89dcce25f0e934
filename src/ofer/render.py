"""Headless CPU rendering of triangle meshes, camera helpers and contact sheets.

Used for synthetic training images and for the pictures the pipeline writes (mesh overlays,
sample sheets). Pure numpy/OpenCV: no GL context, so it runs on any machine and in CI.

Conventions (shared by every function here):
- Screen space: x to the right and y down, in pixels; the centre of pixel (row i, column j)
  is at (x, y) = (j, i), as in OpenCV's warpAffine and the ArcFace keypoint template.
  z points towards the viewer: a larger z is nearer. Screen z is expressed in the units of x
  and y (pixels), so that surface normals computed in screen space are the true ones up to
  the perspective shear; only its order matters to the z-buffer.
- Camera space: OpenCV camera coordinates, x right, y down, z forward (depth), metres.
- FLAME frame: x to the subject's left (the viewer's right when the subject faces the
  camera), y up, z out of the face towards the camera.
- Colours are BGR, as OpenCV reads and writes images; uint8 images, float colours in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# Candidate (triangle, pixel) pairs tested at once by the rasteriser: bounds its memory
# (a few arrays of this many float64) while keeping the numpy calls large.
_FRAGMENT_BUDGET = 1 << 20


def _check_mesh(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be an integer array of shape (F, 3), got {faces.dtype} {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"faces index vertices outside [0, {len(vertices)})")
    return vertices, faces.astype(np.int64)


def rasterize(
    vertices_screen: np.ndarray, faces: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-buffer rasterisation of a triangle mesh in screen space (see the module conventions).

    A pixel belongs to a triangle when its centre lies inside or on the triangle's edges; of
    the triangles covering a pixel the nearest (largest interpolated z) wins, ties going to
    the lower face index. No culling: triangles of either winding are drawn. Barycentrics
    are screen-space (affine) coordinates, not perspective-corrected; for the small
    triangles of a face mesh the difference is negligible.

    Args:
        vertices_screen: (V, 3) screen-space vertices (x, y in pixels, z nearer = larger).
        faces: (F, 3) integer vertex indices.
        height, width: image size in pixels.

    Returns:
        face_index: (H, W) int32, the visible face per pixel, -1 for background.
        depth: (H, W) float64, the interpolated screen z, -inf for background.
        barycentrics: (H, W, 3) float64, weights of the visible face's three vertices
            (summing to 1; zeros for background).
    """
    vertices, faces = _check_mesh(vertices_screen, faces)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    face_index = np.full(height * width, -1, dtype=np.int32)
    depth = np.full(height * width, -np.inf)
    barycentrics = np.zeros((height * width, 3))

    tri = vertices[faces]  # (F, 3 corners, 3 coords)
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # each (F, 3)
    # Twice the signed area; its sign is the winding, which the barycentrics divide out.
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        x_lo = np.maximum(np.ceil(x.min(1)), 0)
        x_hi = np.minimum(np.floor(x.max(1)), width - 1)
        y_lo = np.maximum(np.ceil(y.min(1)), 0)
        y_hi = np.minimum(np.floor(y.max(1)), height - 1)
        drawn = np.isfinite(tri).all((1, 2)) & (area != 0) & (x_hi >= x_lo) & (y_hi >= y_lo)
        # In pixel offsets (u, v) from the bounding box's first pixel centre (x_lo, y_lo),
        # barycentric k is a plane: the edge function of the edge (a_k, b_k) opposite corner
        # k over the area. Depth, sum_k b_k z_k, is a plane too.
        a, b = [1, 2, 0], [2, 0, 1]
        dx, dy = x[:, b] - x[:, a], y[:, b] - y[:, a]  # (F, 3)
        rx, ry = x[:, a] - x_lo[:, None], y[:, a] - y_lo[:, None]  # (F, 3)
        bary_plane = np.stack([-dy, dx, dy * rx - dx * ry], axis=2) / area[:, None, None]  # (F, 3, 3)
        depth_plane = np.einsum("fkc,fk->fc", bary_plane, z)  # (F, 3)
    ids = np.flatnonzero(drawn)  # faces whose bounding box holds at least one pixel centre
    planes = np.concatenate([bary_plane[ids].reshape(-1, 9), depth_plane[ids]], axis=1).T.copy()  # (12, K)
    first_pixel = (y_lo[ids] * width + x_lo[ids]).astype(np.int64)  # (K,)
    box_w = (x_hi[ids] - x_lo[ids] + 1).astype(np.int64)
    box_n = box_w * (y_hi[ids] - y_lo[ids] + 1).astype(np.int64)  # candidate pixels per face
    ends = np.cumsum(box_n)

    start = 0
    while start < len(ids):
        # Faces [start, stop) hold at most _FRAGMENT_BUDGET candidates (at least one face).
        done = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, done + _FRAGMENT_BUDGET, side="right")), start + 1)
        local = np.repeat(np.arange(start, stop), box_n[start:stop])  # (N,) index into ids
        offset = np.arange(len(local)) + done - (ends - box_n)[local]  # (N,) raster order in the box
        v, u = np.divmod(offset, box_w[local])
        # Barycentric k = a u + b v + c with the plane (a, b, c) = planes[3k : 3k + 3] of the face.
        inside = np.ones(len(local), dtype=bool)
        for k in range(3):
            inside &= planes[3 * k][local] * u + planes[3 * k + 1][local] * v + planes[3 * k + 2][local] >= -1e-9
        local, u, v = local[inside], u[inside], v[inside]
        coef = planes[:, local]  # (12, n) the planes of the fragments inside their face
        bary = np.stack([coef[3 * k] * u + coef[3 * k + 1] * v + coef[3 * k + 2] for k in range(3)], axis=1)  # (n, 3)
        frag_depth = coef[9] * u + coef[10] * v + coef[11]
        pixel = first_pixel[local] + v * width + u

        # Z-buffer without sorting: raise the buffer to each pixel's nearest fragment; the
        # fragments that reach it and beat what earlier chunks (lower faces) drew there win,
        # the first of them (the lower face) where several tie.
        before = depth[pixel]
        np.maximum.at(depth, pixel, frag_depth)
        nearest = np.flatnonzero((frag_depth == depth[pixel]) & (frag_depth > before))
        _, first = np.unique(pixel[nearest], return_index=True)
        best = nearest[first]
        face_index[pixel[best]] = ids[local[best]]
        barycentrics[pixel[best]] = bary[best]
        start = stop

    return (
        face_index.reshape(height, width),
        depth.reshape(height, width),
        barycentrics.reshape(height, width, 3),
    )


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-vertex unit normals (V, 3): the area-weighted sum of the adjacent face normals.

    The orientation follows the face winding (right-hand rule in the vertices' frame);
    vertices touched by no face get a zero normal.
    """
    vertices, faces = _check_mesh(vertices, faces)
    tri = vertices[faces]  # (F, 3, 3)
    face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    normals = np.stack(
        [np.bincount(faces.ravel(), np.repeat(face_normals[:, c], 3), minlength=len(vertices)) for c in range(3)],
        axis=1,
    )  # (V, 3)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)


def render_mesh(
    vertices_screen: np.ndarray,
    faces: np.ndarray,
    height: int,
    width: int,
    background: np.ndarray | None = None,
    light_dir: Sequence[float] = (0.0, 0.0, 1.0),
    albedo: Sequence[float] | np.ndarray = (0.8, 0.8, 0.8),
    ambient: float = 0.3,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Lambert-shaded rendering of a mesh, composited over a background.

    Normals are computed in screen space from `vertices_screen` (per vertex, interpolated by
    the barycentrics) and turned towards the viewer, so either side of the surface shades the
    same. Intensity = ambient + (1 - ambient) * max(0, n . l).

    Args:
        vertices_screen: (V, 3) screen-space vertices, e.g. from perspective_project (its z
            shares the units of x and y, as the normals need).
        faces: (F, 3) vertex indices.
        height, width: image size.
        background: (H, W, 3) uint8 BGR image to draw over; None for black.
        light_dir: direction towards the light in screen axes (x right, y down, z towards
            the viewer); the default lights the surface from the viewer's position.
        albedo: BGR colour in [0, 1], either one (3,) colour or per-vertex (V, 3).
        ambient: share of the light that reaches every visible pixel, in [0, 1].
        alpha: opacity of the mesh over the background, in [0, 1].

    Returns:
        image: (H, W, 3) uint8 BGR.
        mask: (H, W) bool, the pixels the mesh covers.
    """
    vertices, faces = _check_mesh(vertices_screen, faces)
    if background is None:
        image = np.zeros((height, width, 3), dtype=np.uint8)
    else:
        if background.shape != (height, width, 3) or background.dtype != np.uint8:
            raise ValueError(
                f"background must be a ({height}, {width}, 3) uint8 image, got {background.dtype} {background.shape}"
            )
        image = background.copy()
    albedo = np.asarray(albedo, dtype=np.float64)
    if albedo.shape not in ((3,), (len(vertices), 3)):
        raise ValueError(f"albedo must have shape (3,) or ({len(vertices)}, 3), got {albedo.shape}")
    light = np.asarray(light_dir, dtype=np.float64)
    if light.shape != (3,) or not np.linalg.norm(light) > 0:
        raise ValueError(f"light_dir must be a non-zero 3-vector, got {light_dir}")
    if not (0.0 <= ambient <= 1.0 and 0.0 <= alpha <= 1.0):
        raise ValueError(f"ambient and alpha must lie in [0, 1], got {ambient} and {alpha}")

    face_index, _, bary = rasterize(vertices, faces, height, width)
    mask = face_index >= 0
    corners = faces[face_index[mask]]  # (P, 3) vertex ids of each covered pixel's face
    weights = bary[mask][:, :, None]  # (P, 3, 1)
    normal = (weights * vertex_normals(vertices, faces)[corners]).sum(1)  # (P, 3)
    normal *= np.where(normal[:, 2:] < 0, -1.0, 1.0)  # face the viewer (+z)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    diffuse = np.clip(normal @ (light / np.linalg.norm(light)), 0.0, None)
    intensity = ambient + (1.0 - ambient) * diffuse  # (P,)
    colour = (weights * albedo[corners]).sum(1) if albedo.ndim == 2 else albedo[None]  # (P, 3) or (1, 3)
    shaded = np.clip(colour * intensity[:, None], 0.0, 1.0) * 255.0
    image[mask] = np.round(alpha * shaded + (1.0 - alpha) * image[mask]).astype(np.uint8)
    return image, mask


def perspective_project(vertices_cam: np.ndarray, focal: float, cx: float, cy: float) -> np.ndarray:
    """Pinhole projection of OpenCV camera-space vertices (metres) to screen space.

    x = focal * X / Z + cx, y = focal * Y / Z + cy, and z = -focal * ln(Z): nearer is larger,
    and a small step dZ along the ray moves z by focal * dZ / Z pixels, the same scale as a
    sideways step moves x and y, so shading normals come out right. Depth is exp(-z / focal).

    Args:
        vertices_cam: (V, 3) points in camera coordinates with Z > 0.
        focal: focal length in pixels; cx, cy: principal point in pixels.

    Returns:
        (V, 3) screen-space vertices.
    """
    vertices_cam = np.asarray(vertices_cam, dtype=np.float64)
    if vertices_cam.ndim != 2 or vertices_cam.shape[1] != 3:
        raise ValueError(f"vertices_cam must have shape (V, 3), got {vertices_cam.shape}")
    depth = vertices_cam[:, 2]
    if not (depth > 0).all():
        raise ValueError(f"{int((~(depth > 0)).sum())} vertices are not in front of the camera (Z <= 0)")
    return np.stack(
        [
            focal * vertices_cam[:, 0] / depth + cx,
            focal * vertices_cam[:, 1] / depth + cy,
            -focal * np.log(depth),
        ],
        axis=1,
    )


# FLAME frame moved by (R, t) is an OpenGL-style camera frame (x right, y up, camera looking
# along -z); this flip turns it into OpenCV camera coordinates.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0])


def flame_to_camera(vertices_flame: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Place a FLAME mesh in front of the camera: flip(R v + t), in OpenCV camera coordinates.

    R and t act in the FLAME frame, whose axes an upright subject facing the camera shares
    with an OpenGL camera; flip = diag(1, -1, -1). With R = I and t = (0, 0, -d) the face
    is d metres in front of the camera, looking into it: the nose (max FLAME z) is the
    nearest point, the top of the head (max FLAME y) is at the top of the image and the
    subject's left (FLAME +x) on the image's right.

    Args:
        vertices_flame: (V, 3) FLAME-frame vertices in metres.
        rotation: (3, 3) rotation matrix; translation: (3,) metres.

    Returns:
        (V, 3) vertices in OpenCV camera coordinates.
    """
    vertices_flame = np.asarray(vertices_flame, dtype=np.float64)
    rotation = np.asarray(rotation, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    if vertices_flame.ndim != 2 or vertices_flame.shape[1] != 3:
        raise ValueError(f"vertices_flame must have shape (V, 3), got {vertices_flame.shape}")
    if rotation.shape != (3, 3) or translation.shape != (3,):
        raise ValueError(f"rotation must be (3, 3) and translation (3,), got {rotation.shape} and {translation.shape}")
    return (vertices_flame @ rotation.T + translation) @ _GL_TO_CV


def image_grid(
    images: Sequence[np.ndarray], ncols: int, labels: Sequence[str] | None = None, pad: int = 4
) -> np.ndarray:
    """Contact sheet: equally sized BGR images in rows of `ncols` on a white background.

    With `labels`, each image gets a line of text above it (shrunk to fit the width).

    Returns:
        (rows * (H + label + pad) + pad, ncols * (W + pad) + pad, 3) uint8.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if ncols < 1 or pad < 0:
        raise ValueError(f"ncols must be >= 1 and pad >= 0, got {ncols} and {pad}")
    height, width = images[0].shape[:2]
    for i, image in enumerate(images):
        if image.shape != (height, width, 3) or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected ({height}, {width}, 3) uint8, got {image.dtype} {image.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")

    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    label_h = 0 if labels is None else 16
    rows = -(-len(images) // ncols)
    cell_h, cell_w = height + label_h + pad, width + pad
    sheet = np.full((rows * cell_h + pad, ncols * cell_w + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = (i // ncols) * cell_h + pad, (i % ncols) * cell_w + pad
        sheet[top + label_h : top + label_h + height, left : left + width] = image
        if labels is not None:
            scale = 0.4
            text_w = cv2.getTextSize(labels[i], font, scale, thickness)[0][0]
            scale *= min(1.0, width / max(text_w, 1))
            cv2.putText(sheet, labels[i], (left, top + 12), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return sheet


def frontal_view(vertices_mm: np.ndarray, faces: np.ndarray, size: int = 160, **shading) -> np.ndarray:
    """A frontal orthographic rendering of a FLAME mesh (y up in FLAME -> up in the image).

    `shading`: `render_mesh`'s background, albedo (e.g. per-vertex colours), ambient, ...
    """
    centre = vertices_mm.mean(0)
    extent = np.ptp(vertices_mm[:, :2], axis=0).max()
    s = 0.9 * size / max(extent, 1e-6)
    screen = np.stack([
        size / 2 + s * (vertices_mm[:, 0] - centre[0]),
        size / 2 - s * (vertices_mm[:, 1] - centre[1]),
        s * vertices_mm[:, 2],  # same scale as x and y, so the shading normals are right
    ], axis=1)
    image, _ = render_mesh(screen, faces, size, size, **shading)
    return image
