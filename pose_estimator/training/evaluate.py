"""Evaluation (FIG. 6): the full estimator on a held-out dataset, against its ground truth.

Frames of one sequence run in order through one :class:`~pose_estimator.estimator.Estimator`
(reset between sequences), exactly as the node runs them: network, heat-map
transformation, solver seeded by the measured joints. The camera-from-base
seed is the sequence's extrinsic (what the node reads from ``/tf_static``)
unless ``extrinsic='none'``, in which case the first frame is seeded by PnP on
a whole-frame detection and later frames by the tracked estimate.

Metrics (keys of the JSON line):

``kp_err_px_median``, ``pck5``
    keypoint error in image px over visible keypoints; share within 5 px.
``ee_pos_err_mm_median``, ``ee_rot_err_deg_median``
    end-effector pose error of frames with a published (converged) pose.
``kinematic_pos_err_mm_median``
    the same for kinematics alone (measured joints, true extrinsic).
``add_auc_100mm``
    DREAM's metric: ADD = mean 3D distance of the keypoints (camera frame)
    between estimate and truth; area under the accuracy-vs-threshold curve
    from 0 to 100 mm, normalised to 1. Frames without a pose count as misses.
``coverage95``
    share of frames whose true end-effector position lies inside the published
    95 % ellipsoid (χ²₃ = 7.815).
``published``
    share of frames with a pose published.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import EstimatorConfig
from ..estimator import Estimator
from ..geometry import rotation_angle
from ..sim.dataset import SyntheticDataset

__all__ = ["evaluate", "add_auc", "calibrate_variance"]

CHI2_2_MEDIAN = 2 * np.log(2)  # median of a chi-square with 2 degrees of freedom

CHI2_3_95 = 7.814727903251178


def add_auc(add_m: np.ndarray, max_threshold_m: float = 0.1, n: int = 1000) -> float:
    """Area under the ADD accuracy curve on [0, max_threshold], normalised; NaN = miss."""
    a = np.where(np.isfinite(add_m), add_m, np.inf)
    th = np.linspace(0.0, max_threshold_m, n)
    acc = (a[None, :] <= th[:, None]).mean(1)
    return float(np.trapezoid(acc, th) / max_threshold_m)


@dataclass
class FrameResult:
    kp_err: np.ndarray
    kp_sigma: np.ndarray
    pos_err: float
    rot_err: float
    kin_err: float
    add: float
    mahal2: float
    ms: float
    converged: bool
    kp_err_all: np.ndarray | None = None  # (K,) every keypoint's error, NaN where it is not visible
    pos_err_xyz: np.ndarray | None = None  # (3,) estimated - true end-effector position, camera frame (m)


def evaluate(model: str | Path, data: str | Path, config: EstimatorConfig | None = None, extrinsic: str = "given",
             max_frames: int | None = None, plots_dir: str | Path | None = None, progress: bool = True,
             estimator: Estimator | None = None) -> dict:
    est = estimator or Estimator.from_files(model, config)
    ds = SyntheticDataset(data)
    if ds.keypoint_names != est.robot.keypoint_names:
        raise ValueError(f"dataset keypoints {ds.keypoint_names} differ from the model's {est.robot.keypoint_names}")
    results: list[FrameResult] = []
    total = sum(len(s) for s in ds.sequences())
    if max_frames:
        total = min(total, max_frames)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="evaluate", dynamic_ncols=True)
    done = False
    for seq in ds.sequences():
        est.reset()
        for f in seq:
            if max_frames and len(results) >= max_frames:
                done = True
                break
            cam = f.camera_model()
            T_cb = f.T_camera_base
            t0 = time.perf_counter()
            e = est.estimate(f.image, cam, f.joints_measured, camera_from_base=T_cb if extrinsic == "given" else None)
            ms = (time.perf_counter() - t0) * 1e3
            vis = f.keypoints_visible
            kp_err_all = np.where(vis, np.linalg.norm(e.keypoints - f.keypoints_2d, axis=1), np.nan)
            kp_err = kp_err_all[vis]
            kp_sigma = np.sqrt(np.trace(e.keypoint_covariance, axis1=1, axis2=2) / 2)[vis]
            q = torch.as_tensor(f.joints_measured)[None]
            kin = T_cb @ est.robot.ee_pose(q)[0].numpy()
            kin_err = float(np.linalg.norm(kin[:3, 3] - f.ee_pose_camera[:3, 3]))
            P_true = f.keypoints_3d @ f.T_camera_base[:3, :3].T + f.T_camera_base[:3, 3]
            # a refused pose counts in no error figure (the solver may still hand back a finite one)
            pos_err_xyz = (e.pose[:3, 3] - f.ee_pose_camera[:3, 3]) if e.converged else np.full(3, np.nan)
            if e.converged:
                pos_err = float(np.linalg.norm(pos_err_xyz))
                rot_err = float(rotation_angle(torch.as_tensor(f.ee_pose_camera[:3, :3]), torch.as_tensor(e.pose[:3, :3])))
                if e.joints is not None and e.camera_from_base is not None:
                    Pb = est.robot.keypoints_3d(torch.as_tensor(e.joints)[None])[0].numpy()
                    Tc = e.camera_from_base
                else:  # rigid: move the kinematic keypoints with the estimated end effector
                    Pb = est.robot.keypoints_3d(q)[0].numpy()
                    Tc = e.pose @ np.linalg.inv(est.robot.ee_pose(q)[0].numpy())
                P_est = Pb @ Tc[:3, :3].T + Tc[:3, 3]
                add = float(np.linalg.norm(P_est - P_true, axis=1).mean())
                d = e.pose[:3, 3] - f.ee_pose_camera[:3, 3]
                try:
                    mahal2 = float(d @ np.linalg.solve(e.covariance[:3, :3], d))
                except np.linalg.LinAlgError:
                    mahal2 = float("inf")
            else:
                pos_err = rot_err = add = mahal2 = float("nan")
            results.append(FrameResult(kp_err, kp_sigma, pos_err, rot_err, kin_err, add, mahal2, ms, e.converged,
                                       kp_err_all, pos_err_xyz))
            if bar is not None:
                bar.update(1)
        if done:
            break
    if bar is not None:
        bar.close()
    if not results:
        raise ValueError(f"{data}: no frames to evaluate")
    kp = np.concatenate([r.kp_err for r in results]) if results else np.zeros(0)
    conv = np.array([r.converged for r in results])
    pos = np.array([r.pos_err for r in results])
    rot = np.array([r.rot_err for r in results])
    kin = np.array([r.kin_err for r in results])
    add = np.array([r.add for r in results])
    m2 = np.array([r.mahal2 for r in results])
    med = lambda a: float(np.nanmedian(a)) if np.isfinite(a).any() else float("nan")
    out = {
        "frames": len(results),
        "published": float(conv.mean()),
        "kp_err_px_median": med(kp),
        "pck5": float((kp < 5.0).mean()) if kp.size else float("nan"),
        "ee_pos_err_mm_median": med(pos) * 1e3,
        "ee_pos_err_mm_p90": float(np.nanpercentile(pos, 90) * 1e3) if np.isfinite(pos).any() else float("nan"),
        "ee_rot_err_deg_median": float(np.degrees(med(rot))),
        "kinematic_pos_err_mm_median": med(kin) * 1e3,
        "add_auc_100mm": add_auc(add),
        "coverage95": float((m2[conv] <= CHI2_3_95).mean()) if conv.any() else float("nan"),
        "ms_per_frame": float(np.mean([r.ms for r in results])),
    }
    # per keypoint (visible frames only; NaN for one never seen): where the error comes from
    per_kp = np.stack([r.kp_err_all for r in results])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a keypoint never seen: all-NaN column
        by_kp = np.nanmedian(per_kp, axis=0)
    out["kp_err_px_median_by_keypoint"] = {n: (round(float(v), 3) if np.isfinite(v) else None)
                                           for n, v in zip(est.robot.keypoint_names, by_kp)}
    # along the camera's axes (z: the line of sight): a single camera sees depth worst
    xyz = np.abs(np.stack([r.pos_err_xyz for r in results])) * 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no converged frame: all NaN
        out["ee_pos_err_mm_median_by_axis"] = {a: round(float(v), 3) if np.isfinite(v) else None
                                               for a, v in zip("xyz", np.nanmedian(xyz, axis=0))}
    out["improvement_vs_kinematics"] = (out["kinematic_pos_err_mm_median"] / out["ee_pos_err_mm_median"]
                                        if out["ee_pos_err_mm_median"] > 0 else float("nan"))
    if plots_dir is not None:
        try:
            _plots(Path(plots_dir), results, add)
        except OSError as e:  # a read-only install, a file in the way: the figures above still count
            warnings.warn(f"plots not written to {plots_dir}: {e}", stacklevel=2)
    return out


def _plots(out: Path, results: list[FrameResult], add: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    th = np.linspace(0, 0.1, 200)
    a = np.where(np.isfinite(add), add, np.inf)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(th * 1e3, (a[None] <= th[:, None]).mean(1))
    ax.set(xlabel="ADD threshold (mm)", ylabel="accuracy", title=f"ADD AUC@100mm = {add_auc(add):.3f}", ylim=(0, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "add_curve.png", dpi=100)
    plt.close(fig)

    kp = np.sort(np.concatenate([r.kp_err for r in results]))
    fig, ax = plt.subplots(figsize=(5, 4))
    if kp.size:
        ax.plot(kp, np.arange(1, kp.size + 1) / kp.size)
    ax.set(xlabel="keypoint error (px)", ylabel="CDF", xscale="log", title="keypoint error (visible keypoints)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "keypoint_error_cdf.png", dpi=100)
    plt.close(fig)

    err = np.concatenate([r.kp_err for r in results])
    sig = np.concatenate([r.kp_sigma for r in results])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(sig, err, s=3, alpha=0.3)
    lim = [max(1e-2, min(sig.min(initial=1), err.min(initial=1))), max(sig.max(initial=1), err.max(initial=1))]
    ax.plot(lim, lim, "k--", lw=1, label="error = predicted σ")
    ax.set(xscale="log", yscale="log", xlabel="predicted σ (px)", ylabel="actual error (px)",
           title="predicted vs actual keypoint error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_true_error.png", dpi=100)
    plt.close(fig)
    (out / "README.txt").write_text("Plots written by `pose-estimator evaluate`.\n")


#: factors on the joint prior's sigma that `calibrate` tries (see calibrate_variance)
JOINT_PRIOR_SCALES = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4)


def calibrate_variance(model: str | Path, data: str | Path, max_frames: int | None = None,
                       config: EstimatorConfig | None = None,
                       joint_prior_scales: Sequence[float] | None = JOINT_PRIOR_SCALES) -> dict:
    """Fit the factors that make a model's uncertainty honest on held-out data.

    1. Keypoints: for each visible keypoint, m² = rᵀ Σ⁻¹ r with r the error against
       the truth; with honest covariances m² follows χ²₂, whose median is 2 ln 2.
       The factor is median(m²) / (2 ln 2) (the median: a few gross misses must not
       decide it).
    2. The published pose: with the keypoint factor applied, m² of each converged
       frame's end-effector position under the published covariance should follow
       χ²₃; the factor is its 95th percentile over χ²₃'s (7.815), so that 95 % of
       the positions fall inside the published 95 % ellipsoid. The solver's
       covariance assumes independent keypoint errors and an exact joint prior;
       this absorbs what those assumptions miss.

    Between the two, with ``joint_prior_scales`` (a grid of factors on the joint
    prior's sigma), the factor whose end-effector error (median over the converged
    frames) is lowest is chosen. The keypoint factor makes each keypoint's variance
    honest on its own, but a network's errors are correlated across keypoints
    (one frame's blur, one pose the network finds hard), so the solver, which takes
    them as independent, trusts the image too much against the measured joints; this
    factor restores the balance for this model. ``None`` or ``(1.0,)`` leaves it at 1.

    3. The published pose again, without the extrinsic (the camera found by PnP and then
       tracked, as the node runs without one): a factor of its own,
       ``pose_covariance_scale_no_extrinsic``, for the frames not seeded by an extrinsic.

    The estimator runs as at run time (kinematic crop from the extrinsic), with the
    model's current factors removed. For 1 and 2 the network runs once per frame: the
    crop comes from the recorded extrinsic, so its keypoints do not depend on the
    factors, and each factor is tried by solving the same observations again. For 3 the
    crops follow the tracking, so it runs again.
    """
    cfg = config or EstimatorConfig()
    est = Estimator.from_files(model, cfg)
    est.model_variance_scale = 1.0
    est.pose_covariance_scale = est.pose_covariance_scale_no_extrinsic = 1.0
    est.joint_prior_scale = 1.0
    frames, seq_of = [], []
    for i, seq in enumerate(SyntheticDataset(data).sequences()):
        for f in seq:
            if max_frames and len(frames) >= max_frames:
                break
            frames.append(f)
            seq_of.append(i)
    # the network's half, once: the seed is the recorded extrinsic, never the tracked pose
    obs = [est.observe(f.image, f.camera_model(), f.joints_measured, camera_from_base=f.T_camera_base)
           for f in frames]
    m2: list[np.ndarray] = []
    for o, f in zip(obs, frames):
        vis = f.keypoints_visible & np.isfinite(f.keypoints_2d).all(1) & np.isfinite(o.keypoints).all(1)
        r = (o.keypoints - f.keypoints_2d)[vis]
        m2.append(np.einsum("ki,kij,kj->k", r, np.linalg.inv(o.keypoint_covariance[vis]), r))
    if not m2 or not np.concatenate(m2).size:
        raise ValueError(f"{data}: no visible keypoints to calibrate on")
    a = np.concatenate(m2)
    scale = float(np.median(a) / CHI2_2_MEDIAN)
    est.model_variance_scale = scale
    joint_fit = {}
    for js in sorted(set(joint_prior_scales or (1.0,))):
        if js <= 0:
            raise ValueError(f"joint prior scales must be > 0, got {js}")
        est.joint_prior_scale = js
        err = [np.linalg.norm(e.pose[:3, 3] - f.ee_pose_camera[:3, 3])
               for e, f in ((est.solve(o), f) for o, f in zip(obs, frames)) if e.converged]
        joint_fit[js] = float(np.median(err)) * 1e3 if err else float("inf")
    # no converged frame at any factor: nothing to choose by
    est.joint_prior_scale = (min(joint_fit, key=joint_fit.get) if np.isfinite(list(joint_fit.values())).any()
                             else 1.0)
    p2 = []
    for o, f in zip(obs, frames):
        e = est.solve(o)
        if e.converged:
            d = e.pose[:3, 3] - f.ee_pose_camera[:3, 3]
            p2.append(float(d @ np.linalg.solve(e.covariance[:3, :3], d)))
    p2 = np.asarray(p2)
    pose_scale = float(np.percentile(p2, 95) / CHI2_3_95) if p2.size >= 10 else 1.0
    # 3. The same without an extrinsic, as the node runs without one: PnP on the first frame of each
    #    sequence, then the tracked camera pose. Its errors are larger than a prior on the camera lets
    #    the solver believe, so its frames get a factor of their own. The crops follow the tracking,
    #    so the network runs again.
    p2x = []
    for k, (f, s_i) in enumerate(zip(frames, seq_of)):
        if k == 0 or s_i != seq_of[k - 1]:
            est.reset()
        e = est.estimate(f.image, f.camera_model(), f.joints_measured)
        if e.converged and e.seed_source != "extrinsic":
            d = e.pose[:3, 3] - f.ee_pose_camera[:3, 3]
            p2x.append(float(d @ np.linalg.solve(e.covariance[:3, :3], d)))
    p2x = np.asarray(p2x)
    pose_scale_x = float(np.percentile(p2x, 95) / CHI2_3_95) if p2x.size >= 10 else pose_scale
    return {"frames": len(frames), "keypoints": int(a.size), "keypoint_variance_scale": scale,
            "share_within_95_before": float((a <= 5.991).mean()),
            "share_within_95_after": float((a / scale <= 5.991).mean()),
            "joint_prior_scale": est.joint_prior_scale,
            "ee_pos_err_mm_median_by_joint_prior_scale": {str(k): v for k, v in joint_fit.items()},
            "pose_covariance_scale": pose_scale,
            "pose_coverage95_before": float((p2 <= CHI2_3_95).mean()) if p2.size else float("nan"),
            "pose_coverage95_after": float((p2 / pose_scale <= CHI2_3_95).mean()) if p2.size else float("nan"),
            "pose_covariance_scale_no_extrinsic": pose_scale_x,
            "no_extrinsic_frames": int(p2x.size),
            "no_extrinsic_coverage95_before": float((p2x <= CHI2_3_95).mean()) if p2x.size else float("nan"),
            "no_extrinsic_coverage95_after": float((p2x / pose_scale_x <= CHI2_3_95).mean()) if p2x.size else float("nan")}


def dumps(metrics: dict) -> str:
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
