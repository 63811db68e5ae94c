"""Synthetic keypoint problems with known answers, for tests, benchmarks and the demo.

These are projections of known 3-D points with controlled noise: the solver's
ground truth without a renderer. (Rendered images come from
:mod:`pose_estimator.sim`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import make_pose, project, so3_exp, transform_points

__all__ = ["look_at", "RigidProblem", "random_rigid_problem", "perturb_pose", "add_keypoint_noise"]


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """T_camera_world for an optical-frame camera at ``eye`` looking at ``target``; (B, 3) -> (B, 4, 4).

    Optical frame: z forward, x right, y down (REP-103).
    """
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype).expand_as(eye)
    z = target - eye
    z = z / z.norm(dim=-1, keepdim=True)
    x = torch.linalg.cross(z, up)
    # Looking straight up or down: any horizontal x will do.
    bad = x.norm(dim=-1, keepdim=True) < 1e-6
    x = torch.where(bad, torch.tensor([1.0, 0.0, 0.0], dtype=eye.dtype).expand_as(x), x)
    x = x / x.norm(dim=-1, keepdim=True)
    y = torch.linalg.cross(z, x)
    R_wc = torch.stack([x, y, z], -1)  # columns: camera axes in world
    T_wc = make_pose(R_wc, eye)
    R_cw = R_wc.transpose(-1, -2)
    return make_pose(R_cw, -(R_cw @ eye[..., None])[..., 0]) if T_wc is not None else None


def perturb_pose(T: torch.Tensor, trans_sigma: float, rot_sigma: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Left-perturb poses (B, 4, 4) by Gaussian translation (m) and rotation (rad) noise."""
    B = T.shape[0]
    dt = torch.randn(B, 3, generator=generator, dtype=T.dtype) * trans_sigma
    dw = torch.randn(B, 3, generator=generator, dtype=T.dtype) * rot_sigma
    return make_pose(so3_exp(dw) @ T[:, :3, :3], T[:, :3, 3] + dt)


def add_keypoint_noise(uv: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None,
                       outlier_fraction: float = 0.0, outlier_px: float = 60.0):
    """Add isotropic Gaussian noise of per-point std ``sigma`` (B, K) px and gross outliers.

    Returns ``(noisy uv, covariance (B, K, 2, 2), outlier mask (B, K))``; the
    covariance is the *claimed* one (sigma^2 I), outliers included, as a
    detector that does not know it failed would report.
    """
    noise = torch.randn(uv.shape, generator=generator, dtype=uv.dtype) * sigma[..., None]
    out = torch.rand(uv.shape[:2], generator=generator, dtype=uv.dtype) < outlier_fraction
    jump = (torch.rand(uv.shape, generator=generator, dtype=uv.dtype) * 2 - 1) * outlier_px
    jump = jump + torch.sign(jump) * outlier_px * 0.25  # at least a quarter of outlier_px away
    noisy = uv + noise + jump * out[..., None]
    cov = torch.diag_embed((sigma ** 2)[..., None].expand(uv.shape))
    return noisy, cov, out


@dataclass
class RigidProblem:
    points: torch.Tensor  # (B, K, 3) body frame
    pose: torch.Tensor  # (B, 4, 4) true T_camera_body
    K: torch.Tensor  # (3, 3)
    uv_true: torch.Tensor  # (B, K, 2)
    width: int
    height: int


def random_rigid_problem(batch: int, num_points: int = 20, size: float = 0.3,
                         distance: tuple[float, float] = (0.8, 2.5), width: int = 640, height: int = 480,
                         focal: float = 600.0, generator: torch.Generator | None = None,
                         dtype: torch.dtype = torch.float64) -> RigidProblem:
    """Random bodies of ``num_points`` points in a cube of ``size`` m, seen from ``distance`` m."""
    g = generator
    P = (torch.rand(batch, num_points, 3, generator=g, dtype=dtype) - 0.5) * size
    d = distance[0] + (distance[1] - distance[0]) * torch.rand(batch, generator=g, dtype=dtype)
    R = so3_exp(torch.randn(batch, 3, generator=g, dtype=dtype) * 2.0)
    # Keep the body near the optical axis so it stays in the image.
    off = (torch.rand(batch, 2, generator=g, dtype=dtype) - 0.5) * 0.3 * d[:, None]
    t = torch.cat([off, d[:, None]], -1)
    T = make_pose(R, t)
    K = torch.tensor([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]], dtype=dtype)
    uv = project(K.expand(batch, 3, 3), transform_points(T, P))
    return RigidProblem(P, T, K, uv, width, height)
