"""Label a synthetic (or recorded, same format) dataset: fiducial frames, interpolated frames, unlabelled frames.

``label_dataset(root)`` writes ``DATASET/seq_XXXXX/labels.jsonl`` (one object
per frame) and ``DATASET/labels.json`` (settings, per-sequence counts and, when
the dataset carries true poses, the accuracy figures), each atomically, and
returns the summary. Only what a deployed system would have is used to make
the labels: images, intrinsics, measured joints (frames and the joint-state
stream), the board and its mount ``T_ee_board``, the robot's URDF. True poses
(``ee_pose_camera``, ``T_base_camera``) are read only to score the labels.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fiducial import FiducialGate, FiducialMeasurement, measure_fiducial, pose_error
from .interpolate import InterpolationConfig, interpolate_sequence, motion_direction

__all__ = ["LabelConfig", "label_sequence", "label_dataset", "matrix_to_pose7", "LABELS_FORMAT_VERSION",
           "estimate_joint_noise", "smooth_joints_at", "CHI2_3DOF_95", "hidden_stretches"]

LABELS_FORMAT_VERSION = 1
CHI2_3DOF_95 = 7.815


@dataclass
class LabelConfig:
    gate: FiducialGate = field(default_factory=FiducialGate)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    #: white joint noise per joint: "auto" estimates it from the joint-state stream (robust third
    #: differences), "config" uses InterpolationConfig.joint_noise_rad / joint_noise_m
    joint_noise: str = "auto"
    #: half-width (joint samples) of a local quadratic fit to the joint-state stream at each image stamp;
    #: 0 uses the measured joints of the frame as they are
    joint_smoothing_half_window: int = 4
    #: evaluation only: ignore the board in stretches of this many seconds (0 = off), separated by
    #: ``show_board_s`` seconds in which it is used, starting with a shown stretch; stress-tests the
    #: interpolation across gaps of known length on data where the board is seen often
    hide_board_s: float = 0.0
    show_board_s: float = 0.5


def matrix_to_pose7(T: np.ndarray) -> list[float]:
    """4x4 -> [x, y, z, qx, qy, qz, qw] (qw >= 0)."""
    import torch

    from ..geometry import quaternion_from_matrix

    q = quaternion_from_matrix(torch.as_tensor(np.asarray(T)[:3, :3], dtype=torch.float64)).numpy()
    return [float(v) for v in np.r_[np.asarray(T)[:3, 3], q]]


def estimate_joint_noise(measured: np.ndarray, floor: float = 1e-6) -> np.ndarray:
    """White-noise std per joint from a densely sampled stream (N, n): robust std of third differences / sqrt(20).

    Smooth motion contributes almost nothing to third differences at the joint rate; backlash kinks are rare
    outliers, which the median absolute deviation ignores.
    """
    m = np.asarray(measured, dtype=np.float64)
    if len(m) < 8:
        return np.full(m.shape[1], floor)
    d3 = np.diff(m, n=3, axis=0)
    mad = np.median(np.abs(d3 - np.median(d3, axis=0)), axis=0) * 1.4826
    return np.maximum(mad / math.sqrt(20.0), floor)


def smooth_joints_at(stream_t: np.ndarray, stream_q: np.ndarray, t: np.ndarray, half_window: int) -> np.ndarray:
    """Local quadratic least-squares fit of the joint stream, evaluated at the stamps ``t`` (seconds)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.zeros((len(t), stream_q.shape[1]))
    for i, ti in enumerate(t):
        k = int(np.argmin(np.abs(stream_t - ti)))
        lo, hi = max(0, k - half_window), min(len(stream_t), k + half_window + 1)
        tt = stream_t[lo:hi] - ti
        if hi - lo < 4:
            out[i] = stream_q[k]
            continue
        A = np.stack([np.ones_like(tt), tt, tt * tt], 1)
        coef, *_ = np.linalg.lstsq(A, stream_q[lo:hi], rcond=None)
        out[i] = coef[0]
    return out


def _smoothing_noise_gain(half_window: int) -> float:
    """Std of the quadratic fit's value at the centre per unit white noise (symmetric window)."""
    if half_window <= 0:
        return 1.0
    tt = np.arange(-half_window, half_window + 1, dtype=np.float64)
    A = np.stack([np.ones_like(tt), tt, tt * tt], 1)
    return float(math.sqrt(np.linalg.inv(A.T @ A)[0, 0]))


def hidden_stretches(t: np.ndarray, hide_s: float, show_s: float) -> np.ndarray:
    """(N,) bool: frames at times ``t`` (s from the sequence start) inside a hidden stretch (see LabelConfig)."""
    t = np.asarray(t, dtype=np.float64)
    if hide_s <= 0:
        return np.zeros(len(t), bool)
    period = hide_s + max(show_s, 0.0)
    return np.mod(t, period) >= max(show_s, 0.0) - 1e-9


def _robot_for(meta: dict):
    from ..robot import RobotModel, resolve_resource

    ref = meta["robot"].get("definition") or meta["robot"]["name"]
    try:
        return RobotModel.from_yaml(ref)
    except (FileNotFoundError, OSError):
        p = resolve_resource(f"resource://robots/{meta['robot']['name']}.yaml")
        return RobotModel.from_yaml(p)


def _kinematics(robot, q: np.ndarray):
    import torch

    with torch.no_grad():
        T, J = robot.ee_jacobian(torch.as_tensor(q, dtype=torch.float64))
    return T.numpy(), J.numpy()


def label_sequence(seq, robot, spec, T_ee_board: np.ndarray, cfg: LabelConfig | None = None,
                   fiducials: list[FiducialMeasurement] | None = None) -> tuple[list[dict], dict]:
    """Label one :class:`~pose_estimator.sim.dataset.SyntheticSequence`.

    Returns ``(records, evaluation)``: one JSON-able dict per frame (the labels.jsonl rows) and per-frame
    arrays for scoring (empty when the sequence has no true poses). ``fiducials`` may be given to skip
    the detection (tests, re-labelling with other interpolation settings).
    """
    cfg = cfg or LabelConfig()
    recs = seq.records()
    N = len(recs)
    stamps = np.array([r["stamp_ns"] for r in recs], dtype=np.int64)
    t = (stamps - stamps[0]) * 1e-9
    joint_names = list(seq.dataset.joint_names) if hasattr(seq, "dataset") else list(robot.joint_names)
    if joint_names != list(robot.joint_names):
        raise ValueError(f"dataset joint order {joint_names} differs from the robot model's {robot.joint_names}")
    q_frames = np.array([r["joints_measured"] for r in recs], dtype=np.float64)

    # the joint-state stream (what the node sees at the joint rate): noise estimate and smoothing
    stream = None
    try:
        stream = seq.joint_stream()
    except (FileNotFoundError, OSError):
        stream = None
    types = getattr(seq, "dataset", None) and seq.dataset.meta.get("joint_types")
    revolute = (np.array([t != "prismatic" for t in types], dtype=bool) if types
                else np.asarray(robot._dof_revolute.cpu().numpy(), dtype=bool))
    if cfg.joint_noise == "auto" and stream is not None and len(stream["measured"]) >= 8:
        noise = estimate_joint_noise(stream["measured"])
    else:
        noise = np.where(revolute, cfg.interpolation.joint_noise_rad, cfg.interpolation.joint_noise_m)
    q = q_frames
    direction = None
    if stream is not None and len(stream["measured"]) > 4:
        st = (stream["stamp_ns"] - stamps[0]) * 1e-9
        band = cfg.interpolation.direction_band_sigma * noise
        dir_stream = motion_direction(stream["measured"], band)
        at = np.clip(np.searchsorted(stream["stamp_ns"], stamps, side="right") - 1, 0, len(st) - 1)
        direction = dir_stream[at]
        if cfg.joint_smoothing_half_window > 0:
            q = smooth_joints_at(st, stream["measured"], t, cfg.joint_smoothing_half_window)
            noise = noise * _smoothing_noise_gain(cfg.joint_smoothing_half_window)

    if fiducials is None:
        fiducials = []
        for i in range(N):
            f = seq.frame(i)
            fiducials.append(measure_fiducial(f.image, f.K, f.dist, spec, T_ee_board, cfg.gate))
    good = np.array([m.accepted for m in fiducials], dtype=bool)
    hidden = hidden_stretches(t, cfg.hide_board_s, cfg.show_board_s)
    good &= ~hidden
    T_fid = np.array([m.T_camera_ee if m.T_camera_ee is not None else np.eye(4) for m in fiducials])
    cov_fid = np.array([m.covariance if m.covariance is not None else np.eye(6) for m in fiducials])
    res = interpolate_sequence(t, q, lambda qq: _kinematics(robot, qq), good, T_fid, cov_fid, cfg.interpolation,
                               joint_noise=noise, direction=direction, revolute=revolute)

    records = []
    for i, r in enumerate(recs):
        m = fiducials[i]
        labelled = res.mode[i] is not None
        records.append({
            "index": int(r["index"]),
            "stamp_ns": int(r["stamp_ns"]),
            "image": r.get("image"),
            "source": None if not labelled else ("fiducial" if res.mode[i] == "fiducial" else "interpolated"),
            "mode": res.mode[i],
            "gap_s": None if not np.isfinite(res.gap_s[i]) else round(float(res.gap_s[i]), 4),
            "ee_pose_camera": matrix_to_pose7(res.T_label[i]) if labelled else None,
            "ee_covariance": [float(v) for v in res.label_cov[i].reshape(-1)] if labelled else None,
            "fiducial": dict(m.summary(), hidden=bool(hidden[i])),
            "fiducial_pose_camera": matrix_to_pose7(m.T_camera_ee) if m.T_camera_ee is not None else None,
            "fiducial_covariance": [float(v) for v in m.covariance.reshape(-1)] if m.covariance is not None else None,
            "keypoints": None,
        })

    # the longest stretch without a good fiducial frame (s), counted in frames between stamps
    runs, run = [], 0
    for g in good:
        run = 0 if g else run + 1
        runs.append(run)
    dt = float(np.median(np.diff(t))) if N > 1 else 0.0
    evaluation: dict[str, Any] = {"mode": res.mode, "S": res.S, "t": t, "variance_factor": res.variance_factor,
                                  "fiducial_frames": int(good.sum()),
                                  "longest_board_gap_s": round(max(runs, default=0) * dt, 3)}
    if all("ee_pose_camera" in r for r in recs):
        from ..sim.dataset import pose7_to_matrix

        T_true = pose7_to_matrix(np.array([r["ee_pose_camera"] for r in recs]))
        # kinematics alone, from the frame's measured joints and the true camera placement (the best it can do)
        T_kin = np.linalg.inv(seq.T_base_camera)[None] @ _kinematics(robot, q_frames)[0]
        evaluation["T_true"] = T_true
        evaluation["T_kin"] = T_kin
        evaluation["T_label"] = res.T_label
        evaluation["cov"] = res.label_cov
        evaluation["T_kin_label"] = res.T_kin
        evaluation["y_filter"] = res.y_filter
        evaluation["cov_filter"] = res.cov_filter
        evaluation["T_fid"] = np.array([m.T_camera_ee if m.T_camera_ee is not None else np.full((4, 4), np.nan)
                                        for m in fiducials])
        evaluation["good"] = good
    return records, evaluation


def _jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _score(evals: list[dict]) -> dict:
    """Accuracy figures against the true poses, over all sequences."""
    fid_p, int_p, int_r, kin_p, inside, fid_raw = [], [], [], [], [], []
    inside_f, inside_i = [], []
    for ev in evals:
        if "T_true" not in ev:
            continue
        for k, mode in enumerate(ev["mode"]):
            Tt = ev["T_true"][k]
            kin_p.append(np.linalg.norm(ev["T_kin"][k][:3, 3] - Tt[:3, 3]))
            if ev["good"][k]:
                fid_raw.append(np.linalg.norm(ev["T_fid"][k][:3, 3] - Tt[:3, 3]))
            if mode is None:
                continue
            e = pose_error(ev["T_label"][k], Tt)
            if mode == "fiducial":
                fid_p.append(np.linalg.norm(e[:3]))
            else:
                int_p.append(np.linalg.norm(e[:3]))
                int_r.append(np.linalg.norm(e[3:]))
            C = ev["cov"][k][:3, :3]
            ok = float(e[:3] @ np.linalg.solve(C, e[:3])) <= CHI2_3DOF_95
            inside.append(ok)
            (inside_f if mode == "fiducial" else inside_i).append(ok)

    def med(v, scale):
        return None if not v else round(float(np.median(v)) * scale, 3)

    if not kin_p:
        return {}
    return {
        "fiducial_pos_err_mm_median": med(fid_p, 1000),
        "fiducial_raw_pos_err_mm_median": med(fid_raw, 1000),
        "interpolated_pos_err_mm_median": med(int_p, 1000),
        "interpolated_pos_err_mm_p90": None if not int_p else round(float(np.percentile(int_p, 90)) * 1000, 3),
        "interpolated_rot_err_deg_median": med(int_r, 180 / math.pi),
        "kinematic_pos_err_mm_median": med(kin_p, 1000),
        "coverage95": None if not inside else round(float(np.mean(inside)), 4),
        "coverage95_fiducial": None if not inside_f else round(float(np.mean(inside_f)), 4),
        "coverage95_interpolated": None if not inside_i else round(float(np.mean(inside_i)), 4),
        "improvement_over_kinematics": (None if not int_p or not kin_p else
                                        round(float(np.median(kin_p) / max(np.median(int_p), 1e-12)), 2)),
    }


def label_dataset(root: str | os.PathLike, cfg: LabelConfig | None = None, coco: str | os.PathLike | None = None,
                  keypoint_map: dict[str, str] | None = None, write: bool = True, sequences: list[int] | None = None,
                  progress=None) -> dict:
    """Label every sequence of the dataset at ``root``; returns the summary (also written to labels.json)."""
    from ..sim.dataset import SyntheticDataset, write_json_atomic

    cfg = cfg or LabelConfig()
    ds = SyntheticDataset(root)
    if ds.meta.get("board") is None:
        raise ValueError(f"{root}: the dataset has no fiducial board (meta.board is null)")
    spec = ds.board_spec()
    T_ee_board = ds.T_ee_board
    robot = _robot_for(ds.meta)
    human = {}
    if coco is not None:
        from .coco import load_coco_keypoints

        human = load_coco_keypoints(coco, ds.keypoint_names, keypoint_map)
    seqs = ds.sequences()
    if sequences is not None:
        seqs = [seqs[i] for i in sequences]
    per_seq, evals = {}, []
    totals = {"frames": 0, "fiducial": 0, "interpolated": 0, "unlabelled": 0, "keypoint_labels": 0}
    for si, seq in enumerate(seqs):
        records, ev = label_sequence(seq, robot, spec, T_ee_board, cfg)
        nk = 0
        for rec in records:
            h = _match_human(human, seq.name, rec.get("image"))
            if h is not None:
                rec["keypoints"] = h
                nk += 1
        counts = {"frames": len(records),
                  "fiducial": sum(r["source"] == "fiducial" for r in records),
                  "interpolated": sum(r["source"] == "interpolated" for r in records),
                  "unlabelled": sum(r["source"] is None for r in records),
                  "keypoint_labels": nk}
        for k in totals:
            totals[k] += counts[k]
        per_seq[seq.name] = dict(counts, good_fiducial_frames=ev["fiducial_frames"],
                                 longest_board_gap_s=ev["longest_board_gap_s"],
                                 variance_factor=round(float(ev["variance_factor"]), 3),
                                 T_camera_base_fitted=None if ev["S"] is None else ev["S"].tolist(),
                                 **({k: v for k, v in _score([ev]).items()} if "T_true" in ev else {}))
        evals.append(ev)
        if write:
            _jsonl_atomic(seq.path / "labels.jsonl", records)
        if progress:
            progress(si + 1, len(seqs), seq.name, counts)
    summary: dict[str, Any] = {"format_version": LABELS_FORMAT_VERSION, "dataset": str(Path(root)), **totals}
    summary["sequences_labelled"] = sum(v["fiducial"] > 0 for v in per_seq.values())
    summary["sequences_without_fiducial"] = sum(v["good_fiducial_frames"] == 0 for v in per_seq.values())
    gaps = [v["longest_board_gap_s"] for v in per_seq.values() if v["fiducial"] > 0]
    summary["longest_board_gap_s"] = max(gaps, default=None)
    summary.update(_score(evals))
    summary["settings"] = {"gate": asdict(cfg.gate), "interpolation": asdict(cfg.interpolation),
                           "joint_noise": cfg.joint_noise,
                           "joint_smoothing_half_window": cfg.joint_smoothing_half_window,
                           "hide_board_s": cfg.hide_board_s, "show_board_s": cfg.show_board_s}
    summary["sequences"] = per_seq
    if write:
        write_json_atomic(Path(root) / "labels.json", summary)
    summary["_evaluations"] = evals  # in-memory only (plots, tests)
    return summary


def _match_human(human: dict, seq_name: str, image: str | None):
    if not human or not image:
        return None
    for key in (f"{seq_name}/{image}", image):
        if key in human:
            return human[key]
    return None
