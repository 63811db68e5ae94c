#!/usr/bin/env python3
"""Pose solver vs OpenCV PnP on the same synthetic projections, side by side.

Two cases, on identical data for every method:

* hard: heteroscedastic noise (a third of the points with 5-10x larger sigma,
  whose covariance our solver is told, as the heat-map transformation would
  tell it) and 10 % gross outliers;
* plain: equal noise on every point, no outliers (weighting cannot help);
* articulated: the Panda's 14 keypoints at random joint configurations, the
  measured joints off by the default joint error (1 degree per joint), the
  camera extrinsic known as after a hand-eye calibration (the estimator's
  ``config/calibrated_camera.yaml`` prior): our articulated solver, which
  corrects the joints, against kinematics alone and against OpenCV PnP on the
  keypoints where the measured joints put them (the whole arm taken as rigid);
  and ours again with the keypoints seen through a distorting lens (the
  synthetic cameras' kind), which the solver undistorts first.

Our solver gets a kinematics-like seed (a few cm / degrees off); OpenCV's
ITERATIVE runs both from scratch and from the same seed, SQPNP and RANSAC
need none. Prints a table, then one JSON object on the last line.

Usage: python benchmarks/solver.py [--poses 256] [--points 20] [--articulated-poses 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pose_estimator.geometry import CameraModel, distort_normalized, project, rotation_angle, transform_points  # noqa: E402,E501
from pose_estimator.robot import RobotModel  # noqa: E402
from pose_estimator.solver import SolverConfig, solve  # noqa: E402
from pose_estimator.synthetic import add_keypoint_noise, look_at, perturb_pose, random_rigid_problem  # noqa: E402


def errors(T_est: np.ndarray, T_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    te = np.linalg.norm(T_est[:, :3, 3] - T_true[:, :3, 3], axis=-1) * 1000
    re = rotation_angle(torch.as_tensor(T_est[:, :3, :3]), torch.as_tensor(T_true[:, :3, :3])).rad2deg().numpy()
    return te, re


def opencv_method(name: str, P, uv, K, seed_T):
    """Run one OpenCV method on every pose; returns (poses (B,4,4), seconds per pose)."""
    B = P.shape[0]
    out = np.tile(np.eye(4), (B, 1, 1))
    t0 = time.perf_counter()
    for b in range(B):
        obj = np.ascontiguousarray(P[b], dtype=np.float64)
        img = np.ascontiguousarray(uv[b], dtype=np.float64)
        if name == "ITERATIVE":
            ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_ITERATIVE)
        elif name == "ITERATIVE+seed":
            rvec0, _ = cv2.Rodrigues(seed_T[b, :3, :3])
            tvec0 = seed_T[b, :3, 3:].copy()
            ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec0, tvec0, useExtrinsicGuess=True,
                                          flags=cv2.SOLVEPNP_ITERATIVE)
        elif name == "SQPNP":
            ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_SQPNP)
        elif name == "RANSAC":
            ok, rvec, tvec, _ = cv2.solvePnPRansac(obj, img, K, None, iterationsCount=200,
                                                   reprojectionError=8.0, confidence=0.999,
                                                   flags=cv2.SOLVEPNP_ITERATIVE)
        else:
            raise ValueError(name)
        if ok:
            out[b, :3, :3] = cv2.Rodrigues(rvec)[0]
            out[b, :3, 3] = tvec.ravel()
        else:
            out[b, :3, 3] = np.nan
    return out, (time.perf_counter() - t0) / B


def ours(P, uv, cov, K, seed_T, cfg):
    t0 = time.perf_counter()
    sol = solve("rigid", uv, cov, K, points=P, initial_pose=seed_T, config=cfg)
    return sol, time.perf_counter() - t0


def run_case(name, prob, uv, cov, seed_T, cfg):
    T_true = prob.pose.numpy()
    rows = {}
    sol, _ = ours(prob.points, uv, cov, prob.K, seed_T, cfg)
    te, re = errors(sol.pose.detach().numpy(), T_true)
    rows["ours"] = (float(np.nanmedian(te)), float(np.nanmedian(re)))
    extra = {"converged": float(sol.converged.float().mean())}
    P, U, K, S = prob.points.numpy(), uv.numpy(), prob.K.numpy(), seed_T.numpy()
    for m in ("ITERATIVE", "ITERATIVE+seed", "SQPNP", "RANSAC"):
        T, _ = opencv_method(m, P, U, K, S)
        te, re = errors(T, T_true)
        rows[m] = (float(np.nanmedian(te)), float(np.nanmedian(re)))
    print(f"\n{name}: median errors over {len(T_true)} poses")
    print(f"  {'method':<16}{'trans (mm)':>12}{'rot (deg)':>12}")
    for k, (t, r) in rows.items():
        print(f"  {k:<16}{t:>12.3f}{r:>12.3f}")
    best = min((k for k in rows if k != "ours"), key=lambda k: rows[k][0])
    return rows, best, extra


def articulated_case(B: int, g: torch.Generator, cfg: SolverConfig) -> dict:
    """The Panda seen by a calibrated camera; keypoints with 2 px noise (a third at 6 px), told to the solver."""
    robot = RobotModel.from_yaml("panda")
    D = torch.float64
    q_true = robot.random_configuration(B, generator=g)
    P_true = robot.keypoints_3d(q_true)
    centre = P_true.mean(1)
    az = torch.rand(B, generator=g, dtype=D) * 2 * np.pi
    el = torch.deg2rad(5 + 45 * torch.rand(B, generator=g, dtype=D))
    dist = 1.4 + 1.0 * torch.rand(B, generator=g, dtype=D)
    eye = centre + dist[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    T_cb = look_at(eye, centre)
    K = torch.tensor([[600.0, 0, 319.5], [0, 600.0, 239.5], [0, 0, 1]], dtype=D)
    uv_true = project(K.expand(B, 3, 3), transform_points(T_cb, P_true))
    sigma = torch.where(torch.rand(B, robot.num_keypoints, generator=g) < 1 / 3, 6.0, 2.0).to(D)
    uv, cov, _ = add_keypoint_noise(uv_true, sigma, generator=g)
    q_meas = q_true + torch.randn(B, robot.n_joints, generator=g, dtype=D) * np.deg2rad(1.0)
    q_meas[:, 7:] = q_true[:, 7:]  # the fingers' prismatic joints: no offset in the default model
    ee_true = (T_cb @ robot.ee_pose(q_true))[:, :3, 3].numpy()
    T_be_meas = robot.ee_pose(q_meas)

    def ours_art(b, keypoints=uv, camera=K):
        return solve("articulated", keypoints[b], cov[b], camera, robot=robot, joints=q_meas[b],
                     initial_camera_from_base=T_cb[b], joint_sigma=np.deg2rad(1.0),
                     camera_prior_sigma=(0.005, 0.005), config=cfg)

    def ee_err_and_ms(**kw):
        """Median end-effector error (mm) of one batched solve, and median ms of a solve at batch 1."""
        sol = ours_art(slice(None), **kw)
        err = np.linalg.norm(sol.pose[:, :3, 3].detach().numpy() - ee_true, axis=-1) * 1000
        ts = []
        for b in range(B):
            t0 = time.perf_counter()
            ours_art(slice(b, b + 1), **kw)
            ts.append(time.perf_counter() - t0)
        return sol, err, statistics.median(ts) * 1000

    sol, ours_err, ms1 = ee_err_and_ms()
    kin_err = np.linalg.norm((T_cb @ T_be_meas)[:, :3, 3].numpy() - ee_true, axis=-1) * 1000
    # The same through a lens with distortion (the synthetic cameras' kind): the solver undistorts first.
    lens = CameraModel(K.numpy(), 640, 480, np.array([-0.08, -0.03, 0.0, -0.0005, -0.01]))
    f, c = K[[0, 1], [0, 1]], K[:2, 2]
    uv_lens = distort_normalized((uv - c) / f, torch.as_tensor(lens.dist)) * f + c
    _, lens_err, ms_lens = ee_err_and_ms(keypoints=uv_lens, camera=lens)
    P_meas = robot.keypoints_3d(q_meas).numpy()
    T_pnp, cv_s = opencv_method("SQPNP", P_meas, uv.numpy(), K.numpy(), T_cb.numpy())
    pnp_err = np.linalg.norm((torch.as_tensor(T_pnp) @ T_be_meas)[:, :3, 3].numpy() - ee_true, axis=-1) * 1000
    r = {
        "articulated_poses": B,
        "articulated_ee_err_mm": float(np.median(ours_err)),
        "articulated_kinematic_ee_err_mm": float(np.median(kin_err)),
        "articulated_opencv_sqpnp_ee_err_mm": float(np.nanmedian(pnp_err)),
        "articulated_converged_fraction": float(sol.converged.float().mean()),
        "articulated_ms_per_pose_batch1": ms1,
        "articulated_lens_ee_err_mm": float(np.median(lens_err)),
        "articulated_lens_ms_per_pose_batch1": ms_lens,
        "opencv_sqpnp_ms_per_pose_articulated": cv_s * 1000,
    }
    r["articulated_time_ratio_vs_opencv_sqpnp"] = r["articulated_ms_per_pose_batch1"] / r[
        "opencv_sqpnp_ms_per_pose_articulated"]
    print(f"\narticulated (Panda, calibrated camera, 1 deg joint offsets): median end-effector error over {B} poses")
    print(f"  {'ours (articulated)':<24}{r['articulated_ee_err_mm']:>10.2f} mm   "
          f"{r['articulated_ms_per_pose_batch1']:8.3f} ms/pose at batch 1")
    print(f"  {'ours, distorting lens':<24}{r['articulated_lens_ee_err_mm']:>10.2f} mm   "
          f"{r['articulated_lens_ms_per_pose_batch1']:8.3f} ms/pose at batch 1")
    print(f"  {'kinematics alone':<24}{r['articulated_kinematic_ee_err_mm']:>10.2f} mm")
    print(f"  {'OpenCV SQPNP, rigid arm':<24}{r['articulated_opencv_sqpnp_ee_err_mm']:>10.2f} mm   "
          f"{r['opencv_sqpnp_ms_per_pose_articulated']:8.3f} ms/pose")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poses", type=int, default=256)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-repeats", type=int, default=5)
    ap.add_argument("--articulated-poses", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(args.seed)
    B, N = args.poses, args.points
    cfg = SolverConfig()

    prob = random_rigid_problem(B, N, generator=g)
    seed_T = perturb_pose(prob.pose, 0.03, np.deg2rad(3.0), generator=g)

    # hard case: a third of the points 5-10x noisier, 10 % gross outliers
    sigma = torch.full((B, N), 1.0, dtype=torch.float64)
    noisy = torch.rand(B, N, generator=g) < 1 / 3
    sigma = torch.where(noisy, sigma * (5 + 5 * torch.rand(B, N, generator=g, dtype=torch.float64)), sigma)
    uv_h, cov_h, _ = add_keypoint_noise(prob.uv_true, sigma, generator=g, outlier_fraction=0.10)
    rows_h, best_h, extra_h = run_case("hard (heteroscedastic + 10% outliers)", prob, uv_h, cov_h, seed_T, cfg)

    # plain case: equal noise, no outliers
    sigma_p = torch.full((B, N), 1.0, dtype=torch.float64)
    uv_p, cov_p, _ = add_keypoint_noise(prob.uv_true, sigma_p, generator=g, outlier_fraction=0.0)
    rows_p, best_p, _ = run_case("plain (equal noise, no outliers)", prob, uv_p, cov_p, seed_T, cfg)

    # timing: our solver at batch 1 and batch 256 on the hard data; OpenCV per pose
    t1 = []
    n1 = min(B, 64)
    for b in range(n1):
        _, dt = ours(prob.points[b:b + 1], uv_h[b:b + 1], cov_h[b:b + 1], prob.K, seed_T[b:b + 1], cfg)
        t1.append(dt)
    ms1 = statistics.median(t1) * 1000
    tb = []
    for _ in range(args.timing_repeats):
        _, dt = ours(prob.points, uv_h, cov_h, prob.K, seed_T, cfg)
        tb.append(dt)
    msb = statistics.median(tb) * 1000 / B
    P, U, K, S = prob.points.numpy(), uv_h.numpy(), prob.K.numpy(), seed_T.numpy()
    cv_ms = {m: opencv_method(m, P, U, K, S)[1] * 1000 for m in ("ITERATIVE", "SQPNP", "RANSAC")}

    art = articulated_case(args.articulated_poses, g, cfg)

    print("\ntime per pose (ms)")
    print(f"  ours batch 1      {ms1:8.3f}")
    print(f"  ours batch {B:<6} {msb:8.3f}   (batch speedup {ms1 / msb:.1f}x)")
    for m, v in cv_ms.items():
        print(f"  OpenCV {m:<10} {v:8.3f}")

    result = {
        "poses": B,
        "points": N,
        "ours_trans_err_mm": rows_h["ours"][0],
        "ours_rot_err_deg": rows_h["ours"][1],
        "best_opencv_method": best_h,
        "best_opencv_trans_err_mm": rows_h[best_h][0],
        "best_opencv_rot_err_deg": rows_h[best_h][1],
        "trans_err_ratio": rows_h["ours"][0] / rows_h[best_h][0],
        "rot_err_ratio": rows_h["ours"][1] / rows_h[best_h][1],
        "homo_ours_trans_err_mm": rows_p["ours"][0],
        "homo_best_opencv_method": best_p,
        "homo_best_opencv_trans_err_mm": rows_p[best_p][0],
        "homo_trans_err_ratio": rows_p["ours"][0] / rows_p[best_p][0],
        "ours_converged_fraction": extra_h["converged"],
        "ms_per_pose_batch1": ms1,
        "ms_per_pose_batch256" if B == 256 else f"ms_per_pose_batch{B}": msb,
        "batch_speedup": ms1 / msb,
        "opencv_ms_per_pose": cv_ms,
        "time_ratio_batch1_vs_opencv_iterative": ms1 / cv_ms["ITERATIVE"],
        "time_ratio_batch256_vs_opencv_iterative": msb / cv_ms["ITERATIVE"],
        **art,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
