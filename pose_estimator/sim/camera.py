"""The simulated camera: placement, intrinsics, lens distortion and the renderer's matrices.

Conventions (REP-103, OpenCV): the camera optical frame has z forward, x
right, y down; pixel (u, v) = (column, row) with the centre of pixel (0, 0) at
(0.0, 0.0). ``T_a_b`` maps points from frame b to frame a.

pybullet renders an ideal pinhole image; lens distortion (plumb_bob) is then
applied to the rendered image with ``cv2.remap``. The pinhole image is rendered
on a canvas padded so that every pixel of the distorted image has a source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .config import CameraConfig

__all__ = [
    "SimCamera",
    "look_at_optical",
    "sample_intrinsics",
    "gl_view_matrix",
    "gl_projection_matrix",
    "project_points",
    "depth_from_buffer",
    "distort_normalized",
    "undistort_normalized",
]


@dataclass
class SimCamera:
    """Intrinsics (K, plumb_bob distortion, size) of one sequence's camera."""

    K: np.ndarray  # (3, 3)
    dist: np.ndarray  # (5,) k1 k2 p1 p2 k3
    width: int
    height: int

    @property
    def has_distortion(self) -> bool:
        return bool(np.any(self.dist != 0))

    def to_dict(self) -> dict:
        return {"K": self.K.tolist(), "dist": self.dist.tolist(), "distortion_model": "plumb_bob",
                "width": self.width, "height": self.height}

    def render_setup(self) -> tuple[np.ndarray, int, int, np.ndarray | None, np.ndarray | None]:
        """What to render for this camera: ``(K_render, width, height, map_x, map_y)``.

        Without distortion that is K itself and no maps. With distortion it is
        a pinhole camera with the same focal lengths on a padded canvas, and
        the ``cv2.remap`` maps that take it to the distorted image.
        """
        if not self.has_distortion:
            return self.K, self.width, self.height, None, None
        uu, vv = np.meshgrid(np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64))
        f, c = np.array([self.K[0, 0], self.K[1, 1]]), self.K[:2, 2]
        xy_d = (np.stack([uu, vv], -1) - c) / f
        ideal = undistort_normalized(xy_d, self.dist) * f + c
        if not np.all(np.isfinite(ideal)) or np.abs(distort_normalized((ideal - c) / f, self.dist) - xy_d).max() > 1e-9:
            raise ValueError(f"distortion {self.dist.tolist()} cannot be inverted over the image")
        pad_l = max(0, int(math.ceil(-ideal[..., 0].min())) + 1)
        if np.abs(ideal - np.stack([uu, vv], -1)).max() > 2 * max(self.width, self.height):
            raise ValueError(f"distortion {self.dist.tolist()} needs an unreasonably large render canvas")
        pad_t = max(0, int(math.ceil(-ideal[..., 1].min())) + 1)
        pad_r = max(0, int(math.ceil(ideal[..., 0].max() - (self.width - 1))) + 1)
        pad_b = max(0, int(math.ceil(ideal[..., 1].max() - (self.height - 1))) + 1)
        Kr = self.K.copy()
        Kr[0, 2] += pad_l
        Kr[1, 2] += pad_t
        map_x = (ideal[..., 0] + pad_l).astype(np.float32)
        map_y = (ideal[..., 1] + pad_t).astype(np.float32)
        return Kr, self.width + pad_l + pad_r, self.height + pad_t + pad_b, map_x, map_y


def distort_normalized(xy: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """OpenCV plumb_bob on normalised coordinates (..., 2)."""
    k1, k2, p1, p2, k3 = (list(dist) + [0.0] * 5)[:5]
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    return np.stack([x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
                     y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y], -1)


def undistort_normalized(xy_d: np.ndarray, dist: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Invert :func:`distort_normalized` by Newton's method (OpenCV's fixed-point iteration diverges
    for strong barrel distortion at wide angles); (..., 2) -> (..., 2)."""
    x = xy_d.copy()
    h = 1e-7
    for _ in range(iterations):
        r = distort_normalized(x, dist) - xy_d
        jx = (distort_normalized(x + [h, 0], dist) - distort_normalized(x - [h, 0], dist)) / (2 * h)
        jy = (distort_normalized(x + [0, h], dist) - distort_normalized(x - [0, h], dist)) / (2 * h)
        det = jx[..., 0] * jy[..., 1] - jy[..., 0] * jx[..., 1]
        step = np.stack([jy[..., 1] * r[..., 0] - jy[..., 0] * r[..., 1],
                         -jx[..., 1] * r[..., 0] + jx[..., 0] * r[..., 1]], -1) / det[..., None]
        x = x - step
        if np.abs(r).max() < 1e-12:
            break
    return x


def look_at_optical(eye: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, 0.0, 1.0]),
                    roll: float = 0.0) -> np.ndarray:
    """T_world_camera (4, 4) for an optical-frame camera at ``eye`` looking at ``target``, rolled by ``roll`` rad."""
    z = np.asarray(target, float) - np.asarray(eye, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-6:  # looking straight up or down: any horizontal x will do
        x = np.array([1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z], -1)
    c, s = math.cos(roll), math.sin(roll)
    R = R @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, eye
    return T


def sample_intrinsics(cfg: CameraConfig, width: int, height: int, distance: float,
                      rng: np.random.Generator) -> SimCamera:
    """Focal length from the scene width the image should span at ``distance``; principal point and distortion."""
    view = rng.uniform(*cfg.view_width)
    hfov = 2 * math.atan(view / 2 / distance)
    hfov = min(max(hfov, math.radians(cfg.fov_deg[0])), math.radians(cfg.fov_deg[1]))
    fx = width / 2 / math.tan(hfov / 2)
    fy = fx * (1 + rng.normal(0, cfg.aspect_std))
    cx = (width - 1) / 2 + rng.normal(0, cfg.principal_point_std) * width
    cy = (height - 1) / 2 + rng.normal(0, cfg.principal_point_std) * height
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    dist = np.zeros(5)
    if rng.random() < cfg.distortion_probability:
        # The radial map r -> r (1 + k1 r^2 + k2 r^4 + k3 r^6) must stay monotonic until it has
        # reached the image corner, or the lens folds and some pixels have no (or two) sources.
        r_corner = math.hypot(max(cx, width - cx) / fx, max(cy, height - cy) / fy)
        for _ in range(50):
            d = np.array([rng.uniform(*cfg.k1), rng.uniform(*cfg.k2), rng.normal(0, cfg.p_std),
                          rng.normal(0, cfg.p_std), rng.uniform(*cfg.k3)])
            r_lim = monotonic_radius(d)
            if _radial(d, r_lim) >= 1.05 * r_corner:
                dist = d
                break
    return SimCamera(K, dist, width, height)


def _radial(dist: np.ndarray, r: float) -> float:
    k1, k2, k3 = dist[0], dist[1], dist[4]
    return r * (1 + r * r * (k1 + r * r * (k2 + r * r * k3)))


def monotonic_radius(dist: np.ndarray, r_max: float = 4.0) -> float:
    """Largest undistorted radius (normalised) up to which the radial distortion stays monotonic
    (derivative >= 0.2, leaving room for the tangential terms), capped at ``r_max``."""
    k1, k2, k3 = dist[0], dist[1], dist[4]
    r = np.linspace(0, r_max, 4001)
    slope = 1 + 3 * k1 * r ** 2 + 5 * k2 * r ** 4 + 7 * k3 * r ** 6
    bad = np.flatnonzero(slope < 0.2)
    return float(r[bad[0] - 1]) if bad.size else r_max


def gl_view_matrix(T_world_camera: np.ndarray) -> list[float]:
    """pybullet view matrix (column-major 16) for an optical-frame camera pose."""
    T_cam_world = np.linalg.inv(T_world_camera)
    # OpenGL eye frame: x right, y up, z backward = optical frame rotated 180 deg about x.
    T_gl_world = np.diag([1.0, -1.0, -1.0, 1.0]) @ T_cam_world
    return T_gl_world.T.reshape(-1).tolist()


def gl_projection_matrix(K: np.ndarray, width: int, height: int, near: float, far: float) -> list[float]:
    """pybullet projection matrix (column-major 16) that makes the tiny renderer draw pinhole K.

    In OpenGL terms pixel u spans NDC x in [2u/W - 1, 2(u+1)/W - 1], so
    u = fx X/Z + cx would need x_ndc = 2 fx/W X/Z + 2 (cx + 0.5)/W - 1 (and
    likewise for v, flipped). pybullet's tiny renderer samples pixel (i, j)
    at the NDC of i and of j + 1 instead of the centres (measured: a small
    sphere's mask centroid lands 0.5 px right and 0.5 px up of the OpenGL
    formula), so cx and cy are shifted by half a pixel to compensate; the
    test suite checks the result to 0.2 px.
    """
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    P = np.zeros((4, 4))
    P[0, 0] = 2 * fx / width
    P[0, 2] = 1 - 2 * cx / width
    P[1, 1] = 2 * fy / height
    P[1, 2] = 2 * (cy + 1.0) / height - 1
    P[2, 2] = -(far + near) / (far - near)
    P[2, 3] = -2 * far * near / (far - near)
    P[3, 2] = -1.0
    return P.T.reshape(-1).tolist()


def depth_from_buffer(buf: np.ndarray, near: float, far: float) -> np.ndarray:
    """OpenGL depth buffer values in [0, 1] -> metric depth along the optical axis (m)."""
    return far * near / (far - (far - near) * buf)


def project_points(p_cam: np.ndarray, camera: SimCamera) -> np.ndarray:
    """Points in the optical frame (N, 3) -> pixels (N, 2) through K and the distortion; NaN behind the camera."""
    p_cam = np.asarray(p_cam, dtype=np.float64).reshape(-1, 3)
    out = np.full((p_cam.shape[0], 2), np.nan)
    ok = p_cam[:, 2] > 1e-6
    if not ok.any():
        return out
    xy = p_cam[ok, :2] / p_cam[ok, 2:3]
    uv = xy * [camera.K[0, 0], camera.K[1, 1]] + camera.K[:2, 2]
    if camera.has_distortion:
        # The polynomial folds back beyond the radius where it stops being monotonic (outside the
        # image, see sample_intrinsics); there the pinhole projection, far outside the image, stands in.
        K = camera.K
        inside = np.linalg.norm(xy, axis=-1) < monotonic_radius(camera.dist)
        if inside.any():
            d, _ = cv2.projectPoints(p_cam[ok][inside].reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K, camera.dist)
            uv[inside] = d.reshape(-1, 2)
    out[ok] = uv
    return out
