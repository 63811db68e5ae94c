"""Heat maps to keypoints with covariance: the differentiable transformation.

Two ways to turn a heat map (logits, one per keypoint) into a position with a
2x2 covariance, both batched over (B, K) and differentiable:

* :func:`soft_argmax2d` — spatial softmax with a temperature, then the expected
  coordinate and the covariance of that distribution.
* :func:`gaussian_fit2d` — a Gaussian fitted to the log heat map (a weighted
  least-squares quadratic in x, y). Its peak may lie outside the map, e.g. a
  keypoint just beyond the image edge whose tail is all the map shows.

Coordinates are heat-map pixels, (x, y) = (column, row), with the centre of
pixel (0, 0) at (0, 0). :func:`keypoints_to_image` maps them back to camera
image pixels through the affine that preprocessing applied (see
:mod:`pose_estimator.preprocess`) composed with :func:`heatmap_to_input_affine`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "pixel_grid",
    "spatial_softmax",
    "soft_argmax2d",
    "gaussian_fit2d",
    "keypoints_to_image",
    "heatmap_to_input_affine",
    "gaussian_targets",
    "prior_maps",
]


def pixel_grid(h: int, w: int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) coordinates of pixel centres, each (h*w,)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                            torch.arange(w, dtype=dtype, device=device), indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def spatial_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over each map's pixels: (B, K, H, W) -> probabilities of the same shape."""
    B, K, H, W = logits.shape
    return torch.softmax(logits.reshape(B, K, H * W) / temperature, dim=-1).reshape(B, K, H, W)


def soft_argmax2d(logits: torch.Tensor, temperature: float = 1.0, min_variance: float = 1.0 / 12.0,
                  return_peak: bool = False):
    """Expected coordinate and covariance of the spatial softmax.

    Args:
        logits: (B, K, H, W) heat-map logits.
        temperature: softmax temperature (lower = sharper).
        min_variance: added to the diagonal: the variance of a uniform
            distribution over one pixel, so a one-pixel spike still has the
            quantisation uncertainty it really has.
        return_peak: also return the softmax's largest value per map (B, K), from
            the same softmax (what the estimator's confidence is made of).

    Returns:
        mean (B, K, 2) in heat-map px, cov (B, K, 2, 2) in px² (and the peak).
    """
    B, K, H, W = logits.shape
    p = torch.softmax(logits.reshape(B, K, H * W) / temperature, dim=-1)
    xs, ys = pixel_grid(H, W, dtype=p.dtype, device=p.device)
    # All five moments in one product, about the map's centre (for precision in float32):
    # E[x], E[y], E[x²], E[xy], E[y²]; Var = E[g gᵀ] - E[g] E[g]ᵀ.
    cx, cy = (W - 1) / 2, (H - 1) / 2
    gx, gy = xs - cx, ys - cy
    m = p @ torch.stack([gx, gy, gx * gx, gx * gy, gy * gy], -1)  # (B, K, 5)
    mx, my = m[..., 0], m[..., 1]
    vxx = m[..., 2] - mx * mx + min_variance
    vxy = m[..., 3] - mx * my
    vyy = m[..., 4] - my * my + min_variance
    mean = torch.stack([mx + cx, my + cy], -1)
    cov = torch.stack([torch.stack([vxx, vxy], -1), torch.stack([vxy, vyy], -1)], -2)
    if return_peak:
        return mean, cov, p.max(-1).values
    return mean, cov


def gaussian_fit2d(logits: torch.Tensor, weight_temperature: float = 2.0, ridge: float = 1e-10,
                   max_variance: float = 1e6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fit a 2D Gaussian to each heat map; the peak may lie outside the map.

    The log of the spatial softmax is fitted, in weighted least squares, by
    ``a + b x + c y + d x² + e xy + f y²`` with weights = the softmax at
    ``weight_temperature`` (the fit follows the map where it has mass, not
    the flat floor far away). For a map whose log is exactly quadratic (a
    Gaussian, even truncated by the map's border) the fit is exact up to the
    ``ridge`` (relative to the normal matrix's mean diagonal). Computed in
    float64 whatever the input dtype; returned in the input dtype.

    Returns:
        mean (B, K, 2) heat-map px, cov (B, K, 2, 2) px², valid (B, K) bool:
        False where the fitted quadratic is not a peak (not negative
        definite); there mean is the soft-argmax and cov is ``max_variance``·I.
    """
    B, K, H, W = logits.shape
    out_dtype = logits.dtype
    logits = logits.double()
    dtype = logits.dtype
    flat = logits.reshape(B, K, H * W)
    logp = torch.log_softmax(flat, dim=-1)
    w = torch.softmax(flat / weight_temperature, dim=-1)
    xs, ys = pixel_grid(H, W, dtype=dtype, device=logits.device)
    # Normalised coordinates keep the normal equations well conditioned.
    cx, cy, s = (W - 1) / 2, (H - 1) / 2, max(H, W) / 2
    u, v = (xs - cx) / s, (ys - cy) / s
    Phi = torch.stack([torch.ones_like(u), u, v, u * u, u * v, v * v], -1)  # (N, 6)
    A = torch.einsum("bkn,ni,nj->bkij", w, Phi, Phi)
    rhs = torch.einsum("bkn,ni,bkn->bki", w, Phi, logp)
    scale = A.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    A = A + ridge * scale * torch.eye(6, dtype=dtype, device=logits.device)
    coef = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)  # (B, K, 6)
    b, c, d, e, f = coef[..., 1], coef[..., 2], coef[..., 3], coef[..., 4], coef[..., 5]
    # log p = const - 1/2 (z - mu)^T Lam (z - mu)  in normalised coordinates z = (u, v)
    Lam = torch.stack([torch.stack([-2 * d, -e], -1), torch.stack([-e, -2 * f], -1)], -2)
    det = Lam[..., 0, 0] * Lam[..., 1, 1] - Lam[..., 0, 1] ** 2
    valid = (Lam[..., 0, 0] > 0) & (det > 0) & torch.isfinite(det)
    safe = torch.where(valid[..., None, None], Lam, torch.eye(2, dtype=dtype, device=logits.device))
    cov_n = torch.linalg.inv(safe)
    mu_n = (cov_n @ torch.stack([b, c], -1).unsqueeze(-1)).squeeze(-1)
    mean = torch.stack([mu_n[..., 0] * s + cx, mu_n[..., 1] * s + cy], -1)
    cov = cov_n * s * s
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    fallback_mean, _ = soft_argmax2d(logits)
    big = max_variance * torch.eye(2, dtype=dtype, device=logits.device)
    finite = torch.isfinite(mean).all(-1) & torch.isfinite(cov).flatten(-2).all(-1)
    ok = valid & finite & (cov.diagonal(dim1=-2, dim2=-1) < max_variance).all(-1)
    mean = torch.where(ok[..., None], mean, fallback_mean)
    cov = torch.where(ok[..., None, None], cov, big)
    return mean.to(out_dtype), cov.to(out_dtype), ok


def keypoints_to_image(mean: torch.Tensor, cov: torch.Tensor,
                       affine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map heat-map coordinates to image pixels through a 2x3 affine (or (B, 2, 3)).

    ``x_image = M x + t``; ``Σ_image = M Σ Mᵀ``.
    """
    affine = affine.to(mean.dtype)
    if affine.dim() == 2:
        affine = affine.unsqueeze(0)
    M = affine[:, None, :, :2]  # (B or 1, 1, 2, 2)
    t = affine[:, None, :, 2]
    uv = (M @ mean.unsqueeze(-1)).squeeze(-1) + t
    cov_img = M @ cov @ M.transpose(-1, -2)
    return uv, cov_img


def heatmap_to_input_affine(stride: int) -> np.ndarray:
    """2x3 affine from heat-map px to network-input px for an output at ``stride``.

    Heat-map pixel i covers input pixels stride·i … stride·i + stride − 1, so its
    centre is ``stride·i + (stride − 1)/2``.
    """
    s = float(stride)
    o = (s - 1.0) / 2.0
    return np.array([[s, 0.0, o], [0.0, s, o]])


def gaussian_targets(mean: torch.Tensor, shape: tuple[int, int], sigma: float,
                     normalize: bool = True) -> torch.Tensor:
    """Target heat maps: an isotropic Gaussian at each ``mean`` (B, K, 2) heat-map px.

    With ``normalize`` each map sums to one (a distribution, for cross-entropy
    against the spatial softmax); otherwise the peak is one. Maps whose mean is
    not finite are all zeros.
    """
    H, W = shape
    xs, ys = pixel_grid(H, W, dtype=mean.dtype, device=mean.device)
    m = torch.nan_to_num(mean, nan=-1e4, posinf=-1e4, neginf=-1e4)
    d2 = (xs - m[..., 0:1]) ** 2 + (ys - m[..., 1:2]) ** 2  # (B, K, HW)
    g = torch.exp(-0.5 * d2 / sigma**2)
    if normalize:
        g = g / g.sum(-1, keepdim=True).clamp_min(1e-12)
    g = torch.where(torch.isfinite(mean).all(-1, keepdim=True), g, torch.zeros_like(g))
    return g.reshape(*mean.shape[:-1], H, W)


def prior_maps(uv: np.ndarray, shape: tuple[int, int], sigma: float) -> torch.Tensor:
    """The kinematic prior as network input: (K, 2) points in input px -> (K, H, W) float32 Gaussians
    of peak 1 and width ``sigma`` input px; rows that are not finite give empty maps."""
    m = torch.as_tensor(np.asarray(uv, dtype=np.float64))[None]
    return gaussian_targets(m, shape, sigma, normalize=False)[0].float()
