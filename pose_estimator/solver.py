"""Variance-weighted robust pose solver (FIG. 3, "pose from keypoints").

One public entry, :func:`solve`, minimises

    sum_k rho( r_k^T Sigma_k^-1 r_k ) + |prior residual|^2,
    r_k = project(T_cam_x * p_k) - u_k

by Levenberg-Marquardt, batched over B problems, where ``Sigma_k`` is the
2x2 pixel covariance the heat-map transformation reports for keypoint k, and
``rho`` a robust loss on the squared Mahalanobis distance so one bad keypoint
cannot drag the pose. Two modes:

``rigid``
    the keypoints are fixed on one body (given in that body's frame);
    unknown: the body's 6-DoF pose in the camera frame.
``articulated``
    the keypoints sit on the links of an arm (:class:`~pose_estimator.robot.RobotModel`);
    unknowns: the camera-from-base pose and joint corrections ``dq``, with the
    measured joints as initial condition and ``dq ~ N(0, diag(sigma_joint^2))``
    as a prior. The end-effector pose follows from the corrected kinematics.

The result carries the 6x6 covariance of the end-effector pose in ROS order
(x, y, z, rotation about X, Y, Z of the camera frame; m and rad) from the
inverse of the Gauss-Newton information ``J^T W J``.

Gradients reach the keypoints and their covariances either implicitly (one
Gauss-Newton step from the detached optimum, the implicit-function-theorem
derivative under the Gauss-Newton approximation; cheap, the default) or by
unrolling every iteration (exact derivative of the computation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .geometry import CameraModel, make_pose, skew, so3_exp, so3_log, undistort_points

__all__ = ["SolverConfig", "PoseSolution", "solve", "robust_weight"]

ROBUST_LOSSES = ("none", "huber", "cauchy")


@dataclass
class SolverConfig:
    """Settings of :func:`solve`; defaults are what the node and training use."""

    max_iterations: int = 40
    #: stop when the cost falls by less than this fraction, or the step is tiny (about 1e-2 x its square
    #: root, rad and m): micrometres, far below any pose uncertainty
    tolerance: float = 1e-7
    #: 'none', 'huber' or 'cauchy', on the Mahalanobis distance of each keypoint
    robust_loss: str = "cauchy"
    #: scale of the robust loss, in standard deviations
    robust_scale: float = 3.0
    #: a keypoint is an inlier when its Mahalanobis distance is at most this
    inlier_threshold: float = 3.5
    lambda_init: float = 1e-3
    #: fewest valid keypoints for a 6-DoF pose; fewer gives converged=False
    min_keypoints: int = 4
    #: largest accepted condition number of the information matrix
    max_condition: float = 1e12
    #: RMS Mahalanobis residual of the inliers above which the solution is rejected
    max_residual: float = 3.0
    #: fewest inliers, as a share of the valid keypoints, for a trusted solution
    min_inlier_fraction: float = 0.5
    #: prior standard deviation of the joint corrections (rad or m), articulated mode
    joint_prior_sigma: float = 0.05
    #: inflate the covariance by the reduced chi-square when it exceeds 1
    inflate_covariance: bool = True
    #: depth (m) below which a point counts as behind the camera
    min_depth: float = 1e-3
    #: 'implicit' (Gauss-Newton step from the detached optimum), 'unroll', or 'none'
    gradient: str = "implicit"
    #: ablation: weight every keypoint alike (isotropic, the median variance of the frame's
    #: keypoints) instead of by its own covariance
    unweighted: bool = False

    def __post_init__(self) -> None:
        if self.robust_loss not in ROBUST_LOSSES:
            raise ValueError(f"robust_loss must be one of {ROBUST_LOSSES}, got '{self.robust_loss}'")
        if self.gradient not in ("implicit", "unroll", "none"):
            raise ValueError(f"gradient must be 'implicit', 'unroll' or 'none', got '{self.gradient}'")
        if self.robust_scale <= 0 or self.max_iterations < 1 or self.joint_prior_sigma <= 0:
            raise ValueError("robust_scale and joint_prior_sigma must be > 0 and max_iterations >= 1")


@dataclass
class PoseSolution:
    """What :func:`solve` returns (B = batch)."""

    #: (B, 4, 4) end-effector (or body) pose in the camera frame, T_camera_ee
    pose: torch.Tensor
    #: (B, 6, 6) covariance of ``pose``: x, y, z (m), rotation about X, Y, Z (rad)
    covariance: torch.Tensor
    #: (B,) RMS Mahalanobis residual over the inliers (dimensionless; ~1 when the covariances are right)
    residual: torch.Tensor
    #: (B,) RMS pixel residual over the inliers (px)
    residual_px: torch.Tensor
    #: (B,) iterations taken
    iterations: torch.Tensor
    #: (B,) the optimum is trustworthy (see ``message`` when not)
    converged: torch.Tensor
    #: (B, K) keypoints used and within ``inlier_threshold``
    inliers: torch.Tensor
    #: one human-readable line per batch element ('' when all is well)
    message: list[str]
    #: articulated mode: (B, 4, 4) camera-from-base pose
    camera_from_base: torch.Tensor | None = None
    #: articulated mode: (B, n) corrected joint positions
    joints: torch.Tensor | None = None
    #: articulated mode: (B, n, n) covariance of the corrected joints
    joint_covariance: torch.Tensor | None = None
    #: articulated mode: (B, 6, 6) covariance of camera_from_base
    camera_covariance: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


def robust_weight(s: torch.Tensor, loss: str, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust cost ``rho(s)`` and IRLS weight ``rho'(s)`` of squared Mahalanobis distances ``s``.

    huber: rho = s (s <= c^2), 2c sqrt(s) - c^2 beyond; cauchy: rho = c^2 log(1 + s / c^2).
    """
    if loss == "none":
        return s, torch.ones_like(s)
    c2 = c * c
    if loss == "huber":
        root = s.clamp_min(1e-30).sqrt()
        big = s > c2
        return torch.where(big, 2 * c * root - c2, s), torch.where(big, c / root, torch.ones_like(s))
    return c2 * torch.log1p(s / c2), 1 / (1 + s / c2)


# --------------------------------------------------------------------------- problems
class _Problem:
    """A least-squares problem over a state tuple; subclasses define the model."""

    n_params: int

    def jacobian(self, state) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (projections, depths, J (B, K, 2, P))"""
        raise NotImplementedError

    def prior(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """-> whitened prior residual (B, Q) and its Jacobian (B, Q, P) (Q may be 0)"""
        raise NotImplementedError

    def retract(self, state, dx: torch.Tensor):
        raise NotImplementedError

    @staticmethod
    def detach(state):
        return tuple(s.detach() for s in state)


def _proj_jac(K: torch.Tensor, pc: torch.Tensor, min_depth: float):
    """Pinhole projection of camera-frame points (B, N, 3) and d(uv)/d(pc) (B, N, 2, 3)."""
    z = pc[..., 2].clamp_min(min_depth)
    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
    iz = 1 / z
    u = fx * pc[..., 0] * iz + cx
    v = fy * pc[..., 1] * iz + cy
    zero = torch.zeros_like(z)
    row_u = torch.stack([fx * iz, zero, -fx * pc[..., 0] * iz * iz], -1)
    row_v = torch.stack([zero, fy * iz, -fy * pc[..., 1] * iz * iz], -1)
    return torch.stack([u, v], -1), pc[..., 2], torch.stack([row_u, row_v], -2)


class _Rigid(_Problem):
    n_params = 6

    def __init__(self, K, points, min_depth):
        self.K, self.points, self.min_depth = K, points, min_depth

    def _pc(self, state):
        R, t = state
        return self.points @ R.transpose(-1, -2) + t[:, None]

    def jacobian(self, state):
        R, t = state
        pc = self._pc(state)
        uv, z, dpi = _proj_jac(self.K, pc, self.min_depth)
        eye = torch.eye(3, dtype=pc.dtype, device=pc.device).expand(pc.shape[:-1] + (3, 3))
        dp = torch.cat([eye, -skew(pc - t[:, None])], -1)  # (B, K, 3, 6)
        return uv, z, dpi @ dp

    def prior(self, state):
        R = state[0]
        return R.new_zeros(R.shape[0], 0), R.new_zeros(R.shape[0], 0, 6)

    def retract(self, state, dx):
        R, t = state
        return so3_exp(dx[:, 3:6]) @ R, t + dx[:, :3]

    def pose(self, state):
        return make_pose(*state)

    def pose_jacobian(self, state):
        R = state[0]
        return torch.eye(6, dtype=R.dtype, device=R.device).expand(R.shape[0], 6, 6)


class _Articulated(_Problem):
    def __init__(self, K, robot, q0, sigma, min_depth, camera_prior=None):
        self.K, self.robot, self.q0, self.min_depth = K, robot, q0, min_depth
        self.sigma = sigma  # (n,)
        self.n = q0.shape[-1]
        self.n_params = 6 + self.n
        self.camera_prior = camera_prior  # (R0, t0, sqrt-information (6,6)) or None
        self._pJ = None  # the priors' Jacobian: constant, built at the first step

    def _pc(self, state, jac):
        R, t, dq = state
        pb, Jb = self.robot.keypoints_and_jacobian(self.q0 + dq, jacobian=jac)
        return pb, Jb, pb @ R.transpose(-1, -2) + t[:, None]

    def jacobian(self, state):
        R, t, dq = state
        pb, Jb, pc = self._pc(state, True)
        uv, z, dpi = _proj_jac(self.K, pc, self.min_depth)
        eye = torch.eye(3, dtype=pc.dtype, device=pc.device).expand(pc.shape[:-1] + (3, 3))
        dq_cols = R[:, None] @ Jb  # (B, K, 3, n)
        dp = torch.cat([eye, -skew(pc - t[:, None]), dq_cols], -1)
        return uv, z, dpi @ dp

    def _prior_jacobian(self, B, dtype, device):
        if self._pJ is None:
            J = torch.zeros(B, self.n, self.n_params, dtype=dtype, device=device)
            J[:, :, 6:] = torch.diag(1 / self.sigma)
            if self.camera_prior is not None:
                Jc = torch.zeros(B, 6, self.n_params, dtype=dtype, device=device)
                Jc[:, :, :6] = self.camera_prior[2]  # first-order: d log(Exp(w) R R0^T) / dw ~ I near the prior
                J = torch.cat([J, Jc], 1)
            self._pJ = J
        return self._pJ

    def prior(self, state):
        R, t, dq = state
        J = self._prior_jacobian(dq.shape[0], dq.dtype, dq.device)
        r = dq / self.sigma
        if self.camera_prior is None:
            return r, J
        R0, t0, L = self.camera_prior
        e = torch.cat([t - t0, so3_log(R @ R0.transpose(-1, -2))], -1)
        rc = (L @ e[..., None])[..., 0]
        return torch.cat([r, rc], 1), J

    def retract(self, state, dx):
        R, t, dq = state
        return so3_exp(dx[:, 3:6]) @ R, t + dx[:, :3], dq + dx[:, 6:]

    def pose(self, state):
        R, t, dq = state
        Tbe = self.robot.ee_pose(self.q0 + dq)
        return make_pose(R, t) @ Tbe

    def pose_jacobian(self, state):
        """d(ee pose in camera, left perturbation) / d(state perturbation), (B, 6, P)."""
        R, t, dq = state
        Tbe, Je = self.robot.ee_jacobian(self.q0 + dq)
        tce = (R @ Tbe[:, :3, 3:])[..., 0] + t
        B = R.shape[0]
        G = torch.zeros(B, 6, self.n_params, dtype=R.dtype, device=R.device)
        G[:, :3, :3] = torch.eye(3, dtype=R.dtype)
        G[:, :3, 3:6] = -skew(tce - t)
        G[:, 3:, 3:6] = torch.eye(3, dtype=R.dtype)
        G[:, :3, 6:] = R @ Je[:, :3]
        G[:, 3:, 6:] = R @ Je[:, 3:]
        return G


# --------------------------------------------------------------------------- engine
def _linearize(problem, state, uv, info, valid, cfg):
    """The cost at ``state`` and the Gauss-Newton normal equations there, from one pass of the model.

    Returns ``(H, g, r, s, z, cost)``: H (B, P, P), g (B, P), residuals r (B, K, 2), squared
    Mahalanobis distances s (B, K), depths z (B, K), robust cost (B,) (inf where a valid
    keypoint falls behind the camera or the cost is not finite).
    """
    pred, z, J = problem.jacobian(state)
    r = pred - uv  # (B, K, 2)
    s = (r[..., None, :] @ info @ r[..., None])[..., 0, 0]
    rho, w = robust_weight(s, cfg.robust_loss, cfg.robust_scale)
    w = (w * valid).detach()  # IRLS weights are held fixed within a step
    W = info * w[..., None, None]
    JtW = J.transpose(-1, -2) @ W  # (B, K, P, 2)
    H = (JtW @ J).sum(1)
    g = (JtW @ r[..., None])[..., 0].sum(1)
    pr, pJ = problem.prior(state)
    H = H + pJ.transpose(-1, -2) @ pJ
    g = g + (pJ.transpose(-1, -2) @ pr[..., None])[..., 0]
    cost = (rho * valid).sum(1) + (pr * pr).sum(1)
    behind = ((z < cfg.min_depth) & (valid > 0)).any(1)
    cost = torch.where(behind | ~torch.isfinite(cost), torch.full_like(cost, math.inf), cost)
    return H, g, r, s, z, cost


def _normal_equations(problem, state, uv, info, valid, cfg):
    return _linearize(problem, state, uv, info, valid, cfg)[:5]


def _lm(problem, state, uv, info, valid, cfg, active):
    """Batched Levenberg-Marquardt with a damping factor per problem.

    Each trial step is linearised where it lands, in the same pass that gives its cost
    (the model, forward kinematics included, is the expensive part): an accepted step's
    normal equations are the next iteration's. Returns the final state, the iterations,
    whether each problem stopped, and :func:`_linearize`'s output at the final state.
    """
    B = uv.shape[0]
    dtype, device = uv.dtype, uv.device
    lam = torch.full((B,), cfg.lambda_init, dtype=dtype, device=device)
    lin = _linearize(problem, state, uv, info, valid, cfg)
    cost = lin[5]
    done = ~active
    iters = torch.zeros(B, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    eye = torch.eye(problem.n_params, dtype=dtype, device=device)
    for _ in range(cfg.max_iterations):
        if bool(done.all()):
            break
        H, g = lin[0], lin[1]
        diag = torch.diagonal(H, dim1=-2, dim2=-1).clamp_min(1e-12)
        A = H + lam[:, None, None] * (torch.diag_embed(diag) + 1e-9 * eye)
        dx = -torch.linalg.solve(A, g[..., None])[..., 0]
        dx = torch.where(torch.isfinite(dx), dx, torch.zeros_like(dx))
        dx = dx * (~done)[:, None]
        cand = problem.retract(state, dx)
        lin_c = _linearize(problem, cand, uv, info, valid, cfg)
        new_cost = lin_c[5]
        # Accept ties too: near the optimum the cost stops changing in floating
        # point while an unrolled derivative is still converging.
        accept = (new_cost <= cost * (1 + 1e-13)) & ~done
        pick = lambda c, s: torch.where(accept.view((B,) + (1,) * (c.ndim - 1)), c, s)  # noqa: E731
        state = tuple(pick(c, s) for c, s in zip(cand, state))
        lin = tuple(pick(c, s) for c, s in zip(lin_c, lin))
        rel = (cost - new_cost).abs() / cost.clamp_min(1e-30)
        small_step = dx.norm(dim=-1) < 1e-12 + cfg.tolerance ** 0.5 * 1e-2
        finished = ~done & ((accept & (rel < cfg.tolerance)) | small_step | (~accept & (lam > 1e10)))
        cost = torch.where(accept, new_cost, cost)
        lam = torch.where(accept, lam * 0.3, lam * 10).clamp(1e-12, 1e12)
        iters = iters + (~done).long()
        stopped = stopped | finished
        done = done | finished
    return state, iters, stopped, lin


def _prepare_measurements(uv, cov, mask, cfg):
    """Validate inputs; returns (uv, information, valid, notes) with invalid entries neutralised."""
    if uv.ndim != 3 or uv.shape[-1] != 2:
        raise ValueError(f"Invalid keypoint shape, we expect BxKx2. Got: {tuple(uv.shape)}")
    if cov.shape != uv.shape + (2,):
        raise ValueError(f"Invalid covariance shape, we expect BxKx2x2 ({tuple(uv.shape) + (2,)}). "
                         f"Got: {tuple(cov.shape)}")
    valid = torch.isfinite(uv).all(-1) & torch.isfinite(cov).flatten(-2).all(-1)
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    cov_sym = 0.5 * (cov + cov.transpose(-1, -2))
    cov_safe = torch.where(valid[..., None, None], cov_sym, torch.eye(2, dtype=cov.dtype, device=cov.device))
    det = cov_safe[..., 0, 0] * cov_safe[..., 1, 1] - cov_safe[..., 0, 1] ** 2
    # A covariance must be positive definite to weight with; zero or negative
    # variance is a broken measurement, not infinite confidence.
    pd = (cov_safe[..., 0, 0] > 0) & (det > 1e-12 * cov_safe[..., 0, 0].abs().clamp_min(1) ** 2)
    n_bad_cov = (valid & ~pd).sum(1)
    valid = valid & pd
    cov_safe = torch.where(valid[..., None, None], cov_safe, torch.eye(2, dtype=cov.dtype, device=cov.device))
    if cfg.unweighted:
        var = 0.5 * cov_safe.diagonal(dim1=-2, dim2=-1).sum(-1)
        med = torch.stack([var[b][valid[b]].median() if bool(valid[b].any()) else var.new_tensor(1.0)
                           for b in range(var.shape[0])])
        cov_safe = med[:, None, None, None] * torch.eye(2, dtype=cov.dtype, device=cov.device).expand_as(cov_safe)
    info = torch.linalg.inv(cov_safe)
    uv_safe = torch.where(valid[..., None], uv, torch.zeros_like(uv))
    return uv_safe, info, valid.to(uv.dtype), n_bad_cov


def _run(problem, state0, uv, cov, mask, cfg, extra_messages=None):
    uv_s, info, validf, n_bad_cov = _prepare_measurements(uv, cov, mask, cfg)
    valid = validf > 0
    B, Kp = uv.shape[:2]
    n_valid = valid.sum(1)
    enough = n_valid >= cfg.min_keypoints
    # A gradient is only worth the extra work where something it could reach asks for one.
    wants_grad = any(torch.is_tensor(v) and v.requires_grad for v in (
        uv, cov, *state0, getattr(problem, "points", None), getattr(problem, "q0", None), problem.K))
    grad_on = torch.is_grad_enabled() and cfg.gradient != "none" and wants_grad
    if cfg.gradient == "unroll" and grad_on:
        state, iters, stopped, lin = _lm(problem, state0, uv_s, info, validf, cfg, enough)
    else:
        with torch.no_grad():
            state, iters, stopped, lin = _lm(problem, problem.detach(state0), uv_s.detach(), info.detach(),
                                             validf, cfg, enough)
        if cfg.gradient == "implicit" and grad_on:
            # One Gauss-Newton step from the detached optimum: zero in value,
            # the implicit-function derivative in gradient.
            state = problem.detach(state)
            H, g, *_ = _normal_equations(problem, state, uv_s, info, validf, cfg)
            H = H + 1e-12 * torch.eye(problem.n_params, dtype=H.dtype, device=H.device)
            dx = -torch.linalg.solve(H, g[..., None])[..., 0]
            dx = torch.where(enough[:, None], dx, torch.zeros_like(dx))
            state = problem.retract(state, dx)
            lin = None  # moved (by zero in value, but not in floating point): linearise again

    if lin is None:
        with torch.no_grad():
            lin = _normal_equations(problem, problem.detach(state), uv_s, info, validf, cfg)
    H, g, r, s, z = (v.detach() for v in lin[:5])
    eig = torch.linalg.eigvalsh(H)
    cond = eig[:, -1] / eig[:, 0].clamp_min(1e-300)
    well_posed = (eig[:, 0] > 0) & (cond < cfg.max_condition)
    inliers = valid & (s <= cfg.inlier_threshold ** 2)
    n_in = inliers.sum(1)
    residual = torch.sqrt((s * inliers).sum(1) / n_in.clamp_min(1))
    px2 = (r * r).sum(-1)
    residual_px = torch.sqrt((px2 * inliers).sum(1) / n_in.clamp_min(1))
    in_front = ~((z < cfg.min_depth) & valid).any(1)

    # Covariance: inverse information (robust weights at the optimum), optionally
    # inflated by the reduced chi-square when the fit is worse than the
    # keypoint covariances claim, so the uncertainty stays honest.
    Hreg = H + 1e-15 * torch.eye(problem.n_params, dtype=H.dtype, device=H.device)
    cov_x = torch.linalg.pinv(Hreg, hermitian=True)
    if cfg.inflate_covariance:
        dof = (2 * n_in - 6).clamp_min(1)
        chi2 = (s * inliers).sum(1) / dof
        cov_x = cov_x * chi2.clamp_min(1.0)[:, None, None]
    pose = problem.pose(state)
    G = problem.pose_jacobian(problem.detach(state))
    pose_cov = G @ cov_x @ G.transpose(-1, -2)
    pose_cov = 0.5 * (pose_cov + pose_cov.transpose(-1, -2))

    finite = torch.isfinite(pose.detach()).flatten(1).all(1) & torch.isfinite(pose_cov).flatten(1).all(1)
    ok_resid = residual <= cfg.max_residual
    enough_in = (n_in >= cfg.min_keypoints) & (n_in >= cfg.min_inlier_fraction * n_valid)
    converged = enough & stopped & well_posed & in_front & finite & ok_resid & enough_in
    messages = []
    for b in range(B):
        why = []
        if int(n_bad_cov[b]):
            why.append(f"{int(n_bad_cov[b])} keypoint(s) with a covariance that is not positive definite ignored")
        if not bool(enough[b]):
            why.append(f"too few valid keypoints: {int(n_valid[b])} < {cfg.min_keypoints}")
        else:
            if not bool(well_posed[b]):
                why.append(f"degenerate keypoint geometry (information condition {float(cond[b]):.3g})")
            if not bool(stopped[b]):
                why.append(f"did not converge in {cfg.max_iterations} iterations")
            if not bool(in_front[b]):
                why.append("solution puts keypoints behind the camera")
            if not bool(ok_resid[b]):
                why.append(f"residual {float(residual[b]):.3g} above max_residual {cfg.max_residual}")
            if not bool(enough_in[b]):
                why.append(f"too few inliers: {int(n_in[b])} of {int(n_valid[b])} keypoints")
            if not bool(finite[b]):
                why.append("non-finite solution")
        if extra_messages:
            why.extend(extra_messages[b])
        messages.append("; ".join(why))
    if not bool(converged.all()):
        # Never hand out a confident pose for a failed solve.
        big = torch.full_like(pose_cov, 0.0)
        big[:, range(6), range(6)] = 1e6
        pose_cov = torch.where(converged[:, None, None], pose_cov, big)
    return state, dict(pose=pose, covariance=pose_cov, residual=residual, residual_px=residual_px,
                       iterations=iters, converged=converged, inliers=inliers, message=messages,
                       cov_x=cov_x)


def _as_K(camera, B, dtype, device) -> tuple[torch.Tensor, CameraModel | None]:
    if isinstance(camera, CameraModel):
        return camera.K_tensor(dtype, device).expand(B, 3, 3), camera
    K = torch.as_tensor(camera, dtype=dtype, device=device)
    if K.shape == (3, 3):
        K = K.expand(B, 3, 3)
    if K.shape != (B, 3, 3):
        raise ValueError(f"Invalid camera matrix shape, we expect 3x3 or Bx3x3. Got: {tuple(K.shape)}")
    if not bool(torch.isfinite(K).all()) or bool((K[:, 0, 0] <= 0).any()) or bool((K[:, 1, 1] <= 0).any()):
        raise ValueError("invalid camera matrix: focal lengths must be finite and > 0")
    return K, None


def solve(
    mode: str,
    keypoints: torch.Tensor,
    covariance: torch.Tensor,
    camera,
    *,
    points: torch.Tensor | None = None,
    initial_pose: torch.Tensor | None = None,
    robot=None,
    joints: torch.Tensor | None = None,
    initial_camera_from_base: torch.Tensor | None = None,
    joint_sigma: torch.Tensor | Sequence[float] | None = None,
    camera_prior_sigma: tuple[float, float] | None = None,
    mask: torch.Tensor | None = None,
    config: SolverConfig | None = None,
) -> PoseSolution:
    """Estimate a pose from keypoints with covariances.

    Args:
        mode: ``'rigid'`` or ``'articulated'``.
        keypoints: (B, K, 2) measured pixels (in the distorted camera image).
        covariance: (B, K, 2, 2) their covariances, px².
        camera: a :class:`CameraModel` (distortion is removed from the
            measurements first) or an intrinsic matrix (3, 3) / (B, 3, 3).
        points: rigid mode: (B, K, 3) or (K, 3) keypoints in the body frame, m.
        initial_pose: rigid mode: (B, 4, 4) seed T_camera_body (e.g. from kinematics).
        robot: articulated mode: a :class:`~pose_estimator.robot.RobotModel`.
        joints: articulated mode: (B, n) measured joint positions (seed and prior mean).
        initial_camera_from_base: articulated mode: (B, 4, 4) or (4, 4) seed.
        joint_sigma: articulated mode: prior std of the joint corrections, (n,) or scalar.
        camera_prior_sigma: articulated mode: (metres, radians) std of a prior
            holding camera_from_base at its seed (a calibrated camera), or None.
        mask: (B, K) keypoints to use (e.g. detected / in the image).
        config: :class:`SolverConfig`.

    Returns:
        :class:`PoseSolution`. Failures (too few points, degenerate geometry,
        residual too large, no convergence) come back with ``converged=False``,
        a message, and a huge covariance: never as a confident pose.

    Example:
        >>> import torch
        >>> from pose_estimator.geometry import make_pose, project
        >>> P = torch.tensor([[[0., 0, 0], [.1, 0, 0], [0, .1, 0], [0, 0, .1], [.1, .1, .1]]], dtype=torch.float64)
        >>> T = make_pose(torch.eye(3, dtype=torch.float64)[None], torch.tensor([[0., 0, 1]], dtype=torch.float64))
        >>> K = torch.tensor([[500., 0, 320], [0, 500, 240], [0, 0, 1]], dtype=torch.float64)
        >>> uv = project(K[None], P @ T[:, :3, :3].mT + T[:, None, :3, 3])
        >>> sol = solve('rigid', uv, torch.eye(2, dtype=torch.float64).expand(1, 5, 2, 2), K, points=P,
        ...             initial_pose=make_pose(torch.eye(3, dtype=torch.float64)[None],
        ...                                    torch.tensor([[0.02, 0, 1.05]], dtype=torch.float64)))
        >>> bool(sol.converged[0]), round(float(sol.pose[0, 2, 3]), 6)
        (True, 1.0)
    """
    cfg = config or SolverConfig()
    if mode not in ("rigid", "articulated"):
        raise ValueError(f"mode must be 'rigid' or 'articulated', got '{mode}'")
    if not torch.is_tensor(keypoints) or not torch.is_tensor(covariance):
        raise ValueError("keypoints and covariance must be torch tensors")
    dtype, device = keypoints.dtype, keypoints.device
    if keypoints.ndim != 3:
        raise ValueError(f"Invalid keypoint shape, we expect BxKx2. Got: {tuple(keypoints.shape)}")
    B = keypoints.shape[0]
    K, cam = _as_K(camera, B, dtype, device)
    uv, cov = keypoints, covariance
    if cam is not None and cam.has_distortion:
        uv, cov = undistort_points(uv, cov, cam)

    if mode == "rigid":
        if points is None or initial_pose is None:
            raise ValueError("rigid mode needs `points` (body-frame keypoints) and `initial_pose`")
        P = torch.as_tensor(points, dtype=dtype, device=device)
        if P.ndim == 2:
            P = P.expand(B, -1, -1)
        if P.shape != keypoints.shape[:2] + (3,):
            raise ValueError(f"Invalid points shape, we expect BxKx3 matching keypoints. Got: {tuple(P.shape)}")
        T0 = torch.as_tensor(initial_pose, dtype=dtype, device=device).expand(B, 4, 4)
        if not bool(torch.isfinite(T0).all()):
            raise ValueError("initial_pose is not finite")
        ptmask = torch.isfinite(P).all(-1)
        mask = ptmask if mask is None else (mask.to(torch.bool) & ptmask)
        P = torch.where(ptmask[..., None], P, torch.zeros_like(P))
        problem = _Rigid(K, P, cfg.min_depth)
        state, out = _run(problem, (T0[:, :3, :3], T0[:, :3, 3]), uv, cov, mask, cfg)
        out.pop("cov_x")
        return PoseSolution(**out)

    if robot is None or joints is None or initial_camera_from_base is None:
        raise ValueError("articulated mode needs `robot`, `joints` and `initial_camera_from_base`")
    q0 = torch.as_tensor(joints, dtype=dtype, device=device)
    if q0.ndim == 1:
        q0 = q0.expand(B, -1)
    if q0.shape != (B, robot.n_joints):
        raise ValueError(f"Invalid joints shape, we expect Bx{robot.n_joints}. Got: {tuple(q0.shape)}")
    finite_q = torch.isfinite(q0).all(1)
    q0 = torch.where(finite_q[:, None], q0, torch.zeros_like(q0))
    if keypoints.shape[1] != robot.num_keypoints:
        raise ValueError(f"articulated mode expects {robot.num_keypoints} keypoints (the robot's), "
                         f"got {keypoints.shape[1]}")
    if joint_sigma is None:
        sigma = torch.full((robot.n_joints,), cfg.joint_prior_sigma, dtype=dtype, device=device)
    else:
        sigma = torch.as_tensor(joint_sigma, dtype=dtype, device=device).expand(robot.n_joints).clone()
    if not bool((sigma > 0).all()):
        raise ValueError("joint_sigma must be > 0")
    T0 = torch.as_tensor(initial_camera_from_base, dtype=dtype, device=device).expand(B, 4, 4)
    prior = None
    if camera_prior_sigma is not None:
        ts, rs = camera_prior_sigma
        L = torch.diag(torch.tensor([1 / ts] * 3 + [1 / rs] * 3, dtype=dtype, device=device)).expand(B, 6, 6)
        prior = (T0[:, :3, :3], T0[:, :3, 3], L)
    problem = _Articulated(K, robot, q0, sigma, cfg.min_depth, prior)
    if not bool(finite_q.all()):
        if mask is None:
            mask = torch.ones(keypoints.shape[:2], dtype=torch.bool, device=device)
        mask = mask.to(torch.bool) & finite_q[:, None]
    dq0 = torch.zeros_like(q0)
    extra = [[] if bool(finite_q[b]) else ["joint state is not finite"] for b in range(B)]
    state, out = _run(problem, (T0[:, :3, :3], T0[:, :3, 3], dq0), uv, cov, mask, cfg, extra)
    cov_x = out.pop("cov_x")
    R, t, dq = state
    return PoseSolution(
        **out,
        camera_from_base=make_pose(R, t),
        joints=q0 + dq,
        joint_covariance=cov_x[:, 6:, 6:],
        camera_covariance=cov_x[:, :6, :6],
    )
