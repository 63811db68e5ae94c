"""The training losses (FIG. 4), each switchable and weighted from the config.

* :func:`heatmap_loss` — intermediate heat-map supervision: cross-entropy
  between the spatial softmax and a target Gaussian of width ``sigma`` (a
  sharply peaked or a wide target, the patent's input parameter).
* :func:`keypoint_nll` — Gaussian negative log-likelihood of the target under
  the soft-argmax mean and covariance, so the covariance means something.
* :func:`pose_losses` — the end-effector pose from the rigid solver run on the
  network's keypoints (gradients flow back through the solver), compared with
  the target pose; and the displacement loss on pairs of frames: the change of
  the predicted pose against the change the joint kinematics reports.
"""

from __future__ import annotations

import math

import torch

from ..geometry import CameraModel, undistort_points
from ..keypoints import gaussian_targets, keypoints_to_image, soft_argmax2d
from ..solver import SolverConfig, solve

__all__ = ["heatmap_loss", "keypoint_nll", "pose_losses", "pose_error"]


def _wmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x * w).sum() / w.sum().clamp_min(1e-9)


def heatmap_loss(logits: torch.Tensor, kp_hm: torch.Tensor, weight: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-entropy between softmax(logits) and N(target, sigma²) per map, minus the target's entropy (>= 0)."""
    B, K, H, W = logits.shape
    target = gaussian_targets(kp_hm.to(logits.dtype), (H, W), sigma).flatten(2)
    logp = torch.log_softmax(logits.flatten(2), -1)
    ce = -(target * logp).sum(-1)
    ent = -(target * torch.log(target.clamp_min(1e-30))).sum(-1)
    return _wmean(ce - ent, weight.to(logits.dtype))


def keypoint_nll(mean: torch.Tensor, cov: torch.Tensor, kp_hm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL (up to a constant) of the targets under (mean, cov), heat-map px."""
    r = torch.nan_to_num(kp_hm - mean)
    info = torch.linalg.inv(cov)
    m = (r.unsqueeze(-2) @ info @ r.unsqueeze(-1))[..., 0, 0]
    nll = 0.5 * m + 0.5 * torch.logdet(cov)
    return _wmean(nll, weight.to(mean.dtype))


def pose_error(T: torch.Tensor, T_ref: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Position error (m) and rotation error (rad) between batches of 4x4 poses.

    Smooth everywhere, identical poses included (a norm or an arccos has no
    gradient at zero error): position sqrt(|dt|² + eps), rotation
    2·arcsin(‖R − R_ref‖_F / √8), the chordal form of the angle.
    """
    dt = torch.sqrt(((T[:, :3, 3] - T_ref[:, :3, 3]) ** 2).sum(-1) + eps)
    chord = torch.sqrt(((T[:, :3, :3] - T_ref[:, :3, :3]) ** 2).sum((-1, -2)) + eps)
    return dt, 2 * torch.asin((chord / math.sqrt(8)).clamp(max=1 - 1e-9))


def pose_losses(mean_hm: torch.Tensor, cov_hm: torch.Tensor, batch: dict, robot, solver_config: SolverConfig,
                mode: str = "articulated", pos_scale: float = 0.01, rot_scale: float = math.radians(2.0),
                with_displacement: bool = True, cap: float = 10.0, max_seed_distance: float = 0.25,
                camera_prior: tuple[float, float] = (0.05, 0.05),
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Pose loss through the solver, and the displacement loss on consecutive pairs.

    The solver runs as the estimator runs it: ``articulated`` (every keypoint,
    camera-from-base seeded by the extrinsic with a prior, the measured joints
    as seed and prior) or ``rigid`` (the hand's keypoints only, seeded by the
    kinematic pose).

    Args:
        mean_hm, cov_hm: (B, K, 2), (B, K, 2, 2) float64 soft-argmax output.
        batch: from :func:`pose_estimator.training.data.collate` (pairs at 2i, 2i+1).
        robot: the :class:`~pose_estimator.robot.RobotModel`.

    Returns:
        (pose loss, displacement loss, stats); losses are 0 (with a graph) when nothing converged.
    """
    uv, cov = keypoints_to_image(mean_hm, cov_hm, batch["affine"])
    B = uv.shape[0]
    # Undistort per sample (each frame has its own camera), then solve all at once with batched K.
    ud, cd, bad = [], [], []
    for b in range(B):
        W, H = batch["size"][b]
        cam = CameraModel(batch["K"][b].numpy(), W, H, batch["dist"][b].numpy())
        u, c = undistort_points(uv[b:b + 1], cov[b:b + 1], cam)
        # Far outside the image (a crop reaching past it) the undistortion may not converge: its NaN
        # would reach the weights through the backward pass even where the point is masked out. Such
        # points are undistorted from the principal point instead (no gradient) and left out.
        nok = ~(torch.isfinite(u).all(-1) & torch.isfinite(c).flatten(-2).all(-1))
        if nok.any():
            centre = torch.as_tensor(cam.K[:2, 2], dtype=uv.dtype)
            u, c = undistort_points(torch.where(nok[..., None], centre, uv[b:b + 1]), cov[b:b + 1], cam)
        ud.append(u)
        cd.append(c)
        bad.append(nok)
    uv, cov = torch.cat(ud), torch.cat(cd)
    mask = (batch["kp_weight"] > 0) & ~torch.cat(bad)
    if mode == "rigid":
        rigid = robot.definition.rigid_indices()
        P_ee = robot.keypoints_in_ee(batch["joints"], rigid)
        uv, cov, mask = uv[:, rigid], cov[:, rigid], mask[:, rigid]
        sol = solve("rigid", uv, cov, batch["K"], points=P_ee, initial_pose=batch["ee_kin"], mask=mask,
                    config=solver_config)
    else:
        sol = solve("articulated", uv, cov, batch["K"], robot=robot, joints=batch["joints"],
                    initial_camera_from_base=batch["camera_from_base"], camera_prior_sigma=camera_prior,
                    mask=mask, config=solver_config)
    # A solve that wandered far from the kinematic seed is a failure however small its residual
    # (wide, uninformative heat maps fit anything): it must not teach the network.
    seed_dist = (sol.pose[:, :3, 3] - batch["ee_kin"][:, :3, 3]).norm(dim=-1)
    ok = sol.converged & (mask.sum(1) >= 4) & (seed_dist < max_seed_distance)
    zero = mean_hm.sum() * 0.0
    dt, dr = pose_error(sol.pose, batch["ee_pose"])
    stats = {"pose_ok": float(ok.double().mean()),
             "pose_err_mm": float(dt.detach()[ok].median() * 1e3) if ok.any() else float("nan")}
    if not ok.any():
        return zero, zero, stats
    w = batch["pose_weight"] * ok.double()
    # Capped: a frame whose keypoints are still far off teaches nothing through the solver.
    per = torch.sqrt((dt / pos_scale) ** 2 + (dr / rot_scale) ** 2 + 1e-6).clamp(max=cap)
    loss_pose = _wmean(per, w)
    loss_disp = zero
    if with_displacement and B >= 2:
        a, b = torch.arange(0, B - 1, 2), torch.arange(1, B, 2)
        okp = ok[a] & ok[b]
        if okp.any():
            Ta, Tb = sol.pose[a], sol.pose[b]
            Ka, Kb = batch["ee_kin"][a], batch["ee_kin"][b]
            d_pred = torch.linalg.inv(Ta) @ Tb
            d_kin = torch.linalg.inv(Ka) @ Kb
            et, er = pose_error(d_pred, d_kin)
            perd = torch.sqrt((et / pos_scale) ** 2 + (er / rot_scale) ** 2 + 1e-6).clamp(max=cap)
            loss_disp = _wmean(perd, okp.double())
            stats["disp_err_mm"] = float(et.detach()[okp].median() * 1e3)
    return loss_pose, loss_disp, stats


def soft_argmax_outputs(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return soft_argmax2d(logits.double(), temperature=temperature)
