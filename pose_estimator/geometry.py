"""Rigid-body and camera geometry on batched torch tensors.

Conventions (REP-103): SI units; camera optical frame z forward, x right,
y down; pixels (u, v) = (column, row) with the centre of pixel (0, 0) at
(0.0, 0.0), as OpenCV. A pose ``T_a_b`` (4x4) maps points from frame b to
frame a. Rotation perturbations are applied on the left,
``R <- Exp(dw) R``, so ``dw`` is a small rotation about the *parent* frame's
fixed axes, the convention of ``PoseWithCovariance.covariance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "skew",
    "so3_exp",
    "so3_log",
    "se3_compose",
    "se3_inverse",
    "make_pose",
    "transform_points",
    "quaternion_from_matrix",
    "matrix_from_quaternion",
    "rotation_angle",
    "CameraModel",
    "project",
    "distort_normalized",
    "undistort_points",
]


def skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix: (..., 3) -> (..., 3, 3) with ``skew(a) @ b == a x b``."""
    z = torch.zeros_like(v[..., 0])
    return torch.stack([
        torch.stack([z, -v[..., 2], v[..., 1]], -1),
        torch.stack([v[..., 2], z, -v[..., 0]], -1),
        torch.stack([-v[..., 1], v[..., 0], z], -1),
    ], -2)


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: rotation vector (..., 3) rad -> rotation matrix (..., 3, 3).

    Uses the Taylor series below 1e-4 rad so the gradient at zero is finite.
    """
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    theta2_safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = theta2_safe.sqrt()
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2_safe)
    K = skew(w)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand(K.shape)
    return eye + a * K + b * (K @ K)


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix (..., 3, 3) -> rotation vector (..., 3), angle in [0, pi].

    From the skew part of R (sin of the angle times the axis) and its trace (cos),
    with the Taylor series near zero so the gradient at the identity is finite; within
    ~8 degrees of a half turn, where the skew part vanishes, from the quaternion instead.
    """
    c = 0.5 * (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1)
    v = 0.5 * torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    s2 = (v * v).sum(-1)
    small = s2 < 1e-12
    s = torch.where(small, torch.ones_like(s2), s2).sqrt()
    # angle / sin(angle); below 1e-6 rad its series 1 + angle^2 / 6 (angle^2 ~ s2 there)
    scale = torch.where(small, 1 + s2 / 6, torch.atan2(s, c) / s)
    w = v * scale[..., None]
    near_pi = c < -0.99
    if bool(near_pi.any()):
        w = torch.where(near_pi[..., None], _so3_log_quaternion(R), w)
    return w


def _so3_log_quaternion(R: torch.Tensor) -> torch.Tensor:
    q = quaternion_from_matrix(R)  # (x, y, z, w), w >= 0
    v, w = q[..., :3], q[..., 3:]
    n = v.norm(dim=-1, keepdim=True)
    # angle = 2 atan2(|v|, w) is well conditioned at both 0 and pi.
    angle = 2 * torch.atan2(n, w)
    scale = torch.where(n < 1e-12, 2 / w.clamp_min(1e-12), angle / n.clamp_min(1e-12))
    return v * scale


def make_pose(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(…,3,3), (…,3) -> (…,4,4) homogeneous transform."""
    T = torch.zeros(R.shape[:-2] + (4, 4), dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1
    return T


def se3_compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


def se3_inverse(T: torch.Tensor) -> torch.Tensor:
    R, t = T[..., :3, :3], T[..., :3, 3]
    Rt = R.transpose(-1, -2)
    return make_pose(Rt, -(Rt @ t[..., None])[..., 0])


def transform_points(T: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Apply (B, 4, 4) to points (B, K, 3)."""
    return p @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def _quaternion_candidates() -> torch.Tensor:
    """(20, 10): rows are the four candidate (unnormalised) quaternions' entries and then their
    four denominators, each a linear form in (r00, r01, …, r22, 1)."""
    def row(*terms):
        v = [0.0] * 10
        for coef, i in terms:
            v[i] += coef
        return v

    one = 9
    d0 = row((1, 0), (1, 4), (1, 8), (1, one))            # 1 + t
    d1 = row((1, one), (1, 0), (-1, 4), (-1, 8))
    d2 = row((1, one), (-1, 0), (1, 4), (-1, 8))
    d3 = row((1, one), (-1, 0), (-1, 4), (1, 8))
    rows = [
        row((1, 7), (-1, 5)), row((1, 2), (-1, 6)), row((1, 3), (-1, 1)), d0,
        d1, row((1, 1), (1, 3)), row((1, 2), (1, 6)), row((1, 7), (-1, 5)),
        row((1, 1), (1, 3)), d2, row((1, 5), (1, 7)), row((1, 2), (-1, 6)),
        row((1, 2), (1, 6)), row((1, 5), (1, 7)), d3, row((1, 3), (-1, 1)),
        d0, d1, d2, d3,
    ]
    return torch.tensor(rows, dtype=torch.float64)


_QUAT_CANDIDATES = _quaternion_candidates()


def quaternion_from_matrix(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrix (..., 3, 3) -> unit quaternion (..., 4) as (x, y, z, w), w >= 0 (ROS order).

    Of the four textbook formulas, each element uses the one with the largest
    denominator (numerically safest); all four come out of one matrix product.
    """
    m = torch.cat([R.flatten(-2), torch.ones(R.shape[:-2] + (1,), dtype=R.dtype, device=R.device)], -1)
    c = m @ _QUAT_CANDIDATES.to(dtype=R.dtype, device=R.device).T  # (..., 20)
    qs = c[..., :16].unflatten(-1, (4, 4))  # (..., 4 candidates, 4)
    idx = c[..., 16:].argmax(-1)
    q = torch.gather(qs, -2, idx[..., None, None].expand(idx.shape + (1, 4)))[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    return q * torch.where(q[..., 3:] < 0, -1.0, 1.0).to(q.dtype)


def matrix_from_quaternion(q: torch.Tensor) -> torch.Tensor:
    """Quaternion (..., 4) as (x, y, z, w) -> rotation matrix (..., 3, 3); normalises first."""
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rotation_angle(Ra: torch.Tensor, Rb: torch.Tensor) -> torch.Tensor:
    """Angle (rad) of the relative rotation Ra^T Rb, (...)."""
    return so3_log(Ra.transpose(-1, -2) @ Rb).norm(dim=-1)


@dataclass
class CameraModel:
    """A pinhole camera with optional lens distortion (``sensor_msgs/CameraInfo``).

    ``K`` is the 3x3 intrinsic matrix; ``dist`` the distortion coefficients in
    OpenCV order (plumb_bob: k1 k2 p1 p2 k3; rational_polynomial: + k4 k5 k6).
    """

    K: np.ndarray
    width: int
    height: int
    dist: np.ndarray = field(default_factory=lambda: np.zeros(5))
    distortion_model: str = "plumb_bob"

    def __post_init__(self) -> None:
        self.K = np.asarray(self.K, dtype=np.float64).reshape(3, 3)
        self.dist = np.asarray(self.dist, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(self.K)) or self.K[0, 0] <= 0 or self.K[1, 1] <= 0:
            raise ValueError(f"invalid camera matrix: focal lengths must be finite and > 0, got "
                             f"fx={self.K[0, 0]}, fy={self.K[1, 1]}")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"invalid image size {self.width}x{self.height}")
        if not np.all(np.isfinite(self.dist)):
            raise ValueError("distortion coefficients must be finite")
        if self.distortion_model not in ("plumb_bob", "rational_polynomial", "none", ""):
            raise ValueError(f"unsupported distortion model '{self.distortion_model}' "
                             "(supported: plumb_bob, rational_polynomial)")

    @property
    def has_distortion(self) -> bool:
        return bool(np.any(self.dist != 0))

    def K_tensor(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        return torch.as_tensor(self.K, dtype=dtype, device=device)

    @classmethod
    def from_camera_info(cls, k, d, width, height, distortion_model="plumb_bob") -> "CameraModel":
        return cls(np.asarray(k, dtype=np.float64).reshape(3, 3), int(width), int(height),
                   np.asarray(d, dtype=np.float64) if len(d) else np.zeros(5), distortion_model or "plumb_bob")


def project(K: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Ideal pinhole projection: K (B, 3, 3), points (B, N, 3) in the camera frame -> (B, N, 2) px."""
    z = p[..., 2:3]
    xy = p[..., :2] / z
    return xy * torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)[:, None] + K[:, None, :2, 2]


def distort_normalized(xy: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """OpenCV's lens model on normalised coordinates (..., 2) with coefficients (D,)."""
    return _distort(xy, _coefficients(dist, xy))


def _coefficients(dist: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The lens model's eight coefficients (k1, k2, p1, p2, k3, k4, k5, k6), missing ones zero."""
    d = torch.zeros(8, dtype=like.dtype, device=like.device)
    n = min(8, dist.shape[-1])
    d[:n] = dist[:n]
    return d.unbind()


def _distort(xy: torch.Tensor, coefficients: tuple[torch.Tensor, ...]) -> torch.Tensor:
    k1, k2, p1, p2, k3, k4, k5, k6 = coefficients
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return torch.stack([xd, yd], -1)


def undistort_points(uv: torch.Tensor, cov: torch.Tensor | None, camera: CameraModel,
                     iterations: int = 20, max_residual_px: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map distorted pixels to the ideal pinhole image of the same K.

    Args:
        uv: (..., 2) observed pixels.
        cov: (..., 2, 2) their covariance in px², or None.
        camera: the camera whose distortion to remove.

    Returns:
        ``(uv_ideal, cov_ideal)``: pixels as an undistorted camera with the same
        K would see them, and the covariance pushed through the local inverse of
        the distortion map (``A Σ Aᵀ``, ``A = (∂distort/∂x)⁻¹`` in pixels).
        Differentiable in ``uv`` and ``cov``: the fixed-point inversion runs
        without gradient, then one Newton step re-attaches the graph.
        A point the lens model cannot be inverted at (the model folds over there,
        far outside the image, or no point distorts to within ``max_residual_px``
        of it) comes back NaN, with a NaN covariance: unknown, never a wrong
        place. The solver and the losses leave such points out.
    """
    if not camera.has_distortion:
        return uv, cov
    K = torch.as_tensor(camera.K, dtype=uv.dtype, device=uv.device)
    dist = torch.as_tensor(camera.dist, dtype=uv.dtype, device=uv.device)
    f = torch.stack([K[0, 0], K[1, 1]])
    c = K[:2, 2]
    target = (uv - c) / f  # distorted, normalised
    coef = _coefficients(dist, uv)
    distort = lambda p: _distort(p, coef)  # noqa: E731
    with torch.no_grad():
        x = target.clone()
        for i in range(iterations):  # the classic fixed-point undistortion
            step = distort(x) - target.detach()
            x = x - step
            # done once no point moves by more than ~1e-9 px (a point with NaN never counts as moving)
            if i % 2 and not bool((step.abs() > 1e-12).any()):
                break
    x = x.detach()
    # Jacobian of the distortion at x by central differences (2x2 per point).
    h = 1e-6
    ex = torch.tensor([h, 0.0], dtype=uv.dtype, device=uv.device)
    ey = torch.tensor([0.0, h], dtype=uv.dtype, device=uv.device)
    jx = (distort(x + ex) - distort(x - ex)) / (2 * h)
    jy = (distort(x + ey) - distort(x - ey)) / (2 * h)
    Jd = torch.stack([jx, jy], -1)  # (..., 2, 2) d(distorted)/d(x)
    # Where the lens model folds over (far outside the image a polynomial distortion turns back) the map
    # has no local inverse: its Jacobian is singular or flips orientation. Those points stay unknown.
    det = Jd[..., 0, 0] * Jd[..., 1, 1] - Jd[..., 0, 1] * Jd[..., 1, 0]
    ok = torch.isfinite(det) & (det > 1e-9)
    eye = torch.eye(2, dtype=uv.dtype, device=uv.device)
    Jinv = torch.linalg.inv(torch.where(ok[..., None, None], Jd, eye))
    x = x + (Jinv @ (target - distort(x))[..., None])[..., 0]
    with torch.no_grad():  # no solution (the iteration did not converge): unknown too
        ok = ok & ((distort(x) - target) * f).norm(dim=-1).lt(max_residual_px)
    nan = torch.full_like(x, float("nan"))
    uv_ideal = torch.where(ok[..., None], x * f + c, nan)
    if cov is None:
        return uv_ideal, None
    # pixel -> normalised (1/f) -> undistort (Jinv) -> pixel (f)
    A = f[:, None] * Jinv / f[None, :]
    A = torch.where(ok[..., None, None], A, torch.full_like(A, float("nan")))
    return uv_ideal, A @ cov @ A.transpose(-1, -2)
