"""``plot-labels``: one sequence's end-effector position over time - true, kinematic, labelled with 2 sigma."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["plot_sequence_labels", "sequence_label_arrays"]


def sequence_label_arrays(root: str | os.PathLike, sequence: int, cfg=None) -> dict:
    """Arrays for the plot: t (N,), true / kinematic / label positions (N, 3) m, label std (N, 3), source.

    Reads ``seq_XXXXX/labels.jsonl`` when it exists; otherwise labels the sequence in memory. The kinematic
    curve is FK of the measured joints placed with the dataset's true camera pose (the best kinematics
    alone can do); the true curve is the dataset's ``ee_pose_camera`` (absent for recorded data).
    """
    from ..sim.dataset import SyntheticDataset, pose7_to_matrix
    from .labels import _kinematics, _robot_for, label_sequence

    ds = SyntheticDataset(root)
    seqs = ds.sequences()
    if not 0 <= sequence < len(seqs):
        raise IndexError(f"sequence {sequence} out of range ({len(seqs)} sequences)")
    seq = seqs[sequence]
    recs = seq.records()
    path = seq.path / "labels.jsonl"
    robot = _robot_for(ds.meta)
    if path.is_file():
        labels = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        labels, _ = label_sequence(seq, robot, ds.board_spec(), ds.T_ee_board, cfg)
    if len(labels) != len(recs):
        raise ValueError(f"{path}: {len(labels)} labels for {len(recs)} frames (stale labels? run label again)")
    st = np.array([r["stamp_ns"] for r in recs], dtype=np.int64)
    t = (st - st[0]) * 1e-9
    q = np.array([r["joints_measured"] for r in recs], dtype=np.float64)
    kin = (np.linalg.inv(seq.T_base_camera)[None] @ _kinematics(robot, q)[0])[:, :3, 3]
    true = None
    if all("ee_pose_camera" in r for r in recs):
        true = pose7_to_matrix(np.array([r["ee_pose_camera"] for r in recs]))[:, :3, 3]
    lab = np.full((len(recs), 3), np.nan)
    std = np.full((len(recs), 3), np.nan)
    source = []
    for i, lb in enumerate(labels):
        source.append(lb["source"])
        if lb["ee_pose_camera"] is not None:
            lab[i] = lb["ee_pose_camera"][:3]
            C = np.asarray(lb["ee_covariance"], dtype=np.float64).reshape(6, 6)
            std[i] = np.sqrt(np.clip(np.diag(C)[:3], 0, None))
    return {"t": t, "true": true, "kinematic": kin, "label": lab, "std": std, "source": source, "name": seq.name}


def plot_sequence_labels(root: str | os.PathLike, sequence: int, out: str | os.PathLike, cfg=None) -> Path:
    """Write a PNG: x, y, z (camera frame) of the end effector vs time, with the label's 2-sigma band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = sequence_label_arrays(root, sequence, cfg)
    t, lab, std = a["t"], a["label"], a["std"]
    fid = np.array([s == "fiducial" for s in a["source"]])
    ref = a["true"] if a["true"] is not None else a["kinematic"]
    fig, grid = plt.subplots(3, 2, figsize=(13, 8), sharex=True, gridspec_kw={"width_ratios": [1.2, 1]})
    axes = grid[:, 0]
    for j, ax in enumerate(axes):
        mm = lambda v: (v - np.nanmean(ref[:, j])) * 1000  # noqa: E731 - offsets keep mm readable
        ax.fill_between(t, mm(lab[:, j] - 2 * std[:, j]), mm(lab[:, j] + 2 * std[:, j]), color="tab:blue", alpha=0.25,
                        linewidth=0, label="label ±2σ")
        if a["true"] is not None:
            ax.plot(t, mm(a["true"][:, j]), color="k", lw=1.2, label="true")
        ax.plot(t, mm(a["kinematic"][:, j]), color="tab:red", lw=1.0, ls="--", label="kinematics (true camera)")
        ax.plot(t, mm(lab[:, j]), color="tab:blue", lw=1.0, label="label")
        ax.plot(t[fid], mm(lab[fid, j]), "o", ms=3, color="tab:green", label="fiducial frame")
        unl = np.isnan(lab[:, j])
        if unl.any():
            ax.plot(t[unl], np.full(unl.sum(), np.nanmin(mm(a["kinematic"][:, j]))), "|", color="0.5",
                    label="unlabelled")
        ax.set_ylabel(f"{'xyz'[j]} − {np.nanmean(ref[:, j]):+.3f} m  [mm]")
        ax.grid(alpha=0.3)
    # right column: the same curves minus the reference (truth when known), where millimetres show
    what = "true" if a["true"] is not None else "kinematics"
    for j, ax in enumerate(grid[:, 1]):
        d = lambda v: (v - ref[:, j]) * 1000  # noqa: E731
        ax.fill_between(t, d(lab[:, j] - 2 * std[:, j]), d(lab[:, j] + 2 * std[:, j]), color="tab:blue", alpha=0.25,
                        linewidth=0)
        ax.axhline(0, color="k", lw=1.0)
        ax.plot(t, d(a["kinematic"][:, j]), color="tab:red", lw=1.0, ls="--")
        ax.plot(t, d(lab[:, j]), color="tab:blue", lw=1.0)
        ax.plot(t[fid], d(lab[:, j])[fid], "o", ms=3, color="tab:green")
        ax.set_ylabel(f"{'xyz'[j]} − {what} [mm]")
        ax.grid(alpha=0.3)
    grid[-1, 1].set_xlabel("time [s]")
    axes[-1].set_xlabel("time [s]")
    n_f, n_u = int(fid.sum()), int(np.isnan(lab[:, 0]).sum())
    fig.suptitle(f"{a['name']}: end-effector position in the camera frame, and its deviation from the {what} one "
                 f"({n_f} fiducial, {len(t) - n_f - n_u} interpolated, {n_u} unlabelled frames)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
