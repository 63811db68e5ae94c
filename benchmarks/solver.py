#!/usr/bin/env python3
"""Pose solver vs OpenCV PnP on the same synthetic projections, side by side.

Two cases, on identical data for every method:

* hard: heteroscedastic noise (a third of the points with 5-10x larger sigma,
  whose covariance our solver is told, as the heat-map transformation would
  tell it) and 10 % gross outliers;
* plain: equal noise on every point, no outliers (weighting cannot help).

Our solver gets a kinematics-like seed (a few cm / degrees off); OpenCV's
ITERATIVE runs both from scratch and from the same seed, SQPNP and RANSAC
need none. Prints a table, then one JSON object on the last line.

Usage: python benchmarks/solver.py [--poses 256] [--points 20] [--seed 0]
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

from pose_estimator.geometry import rotation_angle  # noqa: E402
from pose_estimator.solver import SolverConfig, solve  # noqa: E402
from pose_estimator.synthetic import add_keypoint_noise, perturb_pose, random_rigid_problem  # noqa: E402


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poses", type=int, default=256)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-repeats", type=int, default=5)
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
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
