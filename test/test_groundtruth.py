"""Self-labelling ground truth (pose_estimator.groundtruth): gate, filter/smoother, unlabelled frames, COCO, CLI."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from pose_estimator.groundtruth.coco import load_coco_keypoints, parse_keypoint_map, write_coco_keypoints
from pose_estimator.groundtruth.fiducial import measure_fiducial, pose_error, pose_perturb
from pose_estimator.groundtruth.interpolate import (InterpolationConfig, interpolate_sequence, kalman_filter,
                                                    motion_direction, rts_smoother)
from pose_estimator.sim.board import board_texture
from pose_estimator.sim.config import BoardSpec

# ----------------------------------------------------------------------------- fiducial gate

K_TEST = np.array([[600.0, 0, 319.5], [0, 600.0, 239.5], [0, 0, 1]])
T_EE_BOARD = np.array([[0, 0, -1, 0.10], [1, 0, 0, -0.08], [0, -1, 0, 0.12], [0, 0, 0, 1.0]])


def _board_pose(distance: float, tilt_deg: float = 35.0) -> np.ndarray:
    """Board centred on the optical axis at ``distance``, tilted about its y axis."""
    spec = BoardSpec()
    R = cv2.Rodrigues(np.array([0.0, math.radians(tilt_deg), 0.0]))[0] @ \
        cv2.Rodrigues(np.array([math.radians(10.0), 0.0, 0.0]))[0]
    centre = np.array([spec.width / 2, spec.height / 2, 0.0])
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.array([0.01, -0.02, distance]) - R @ centre
    return T


def _render_board(T_cb: np.ndarray, K: np.ndarray = K_TEST, size=(640, 480), ss: int = 4) -> np.ndarray:
    """An antialiased RGB image of the default board at pose T_cb (supersampled perspective warp)."""
    spec = BoardSpec()
    tex = board_texture(spec)
    px = spec.texture_px_per_square
    a = spec.square_length / px
    A = np.array([[a, 0, 0.5 * a], [0, a, 0.5 * a], [0, 0, 1.0]])  # texel centre -> board metres
    P = K @ np.c_[T_cb[:3, :2], T_cb[:3, 3]]  # board plane (x, y, 1) -> pixel
    S = np.array([[ss, 0, (ss - 1) / 2], [0, ss, (ss - 1) / 2], [0, 0, 1.0]])
    H = S @ P @ A
    w, h = size
    hi = cv2.warpPerspective(tex, H, (w * ss, h * ss), flags=cv2.INTER_LINEAR, borderValue=140)
    img = cv2.resize(hi, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)


@pytest.fixture(scope="module")
def sharp_board():
    T_cb = _board_pose(0.7)
    return T_cb, _render_board(T_cb)


def test_gate_accepts_a_sharp_board_and_its_pose_is_right(sharp_board):
    T_cb, img = sharp_board
    m = measure_fiducial(img, K_TEST, None, BoardSpec(), T_EE_BOARD)
    assert m.detected and m.accepted, m.reasons
    assert m.corners == 9 and m.reprojection_rms < 0.3
    e = pose_error(m.T_camera_ee, T_cb @ np.linalg.inv(T_EE_BOARD))
    assert np.linalg.norm(e[:3]) < 0.003 and np.linalg.norm(e[3:]) < math.radians(0.5)
    # the covariance is symmetric positive definite and the error is plausible under it
    C = m.covariance
    assert np.allclose(C, C.T) and np.linalg.eigvalsh(C).min() > 0
    assert e @ np.linalg.solve(C, e) < 22.46  # chi-square 6 dof, 99.9 %


@pytest.mark.parametrize("sigma", [1.25, 1.5])
def test_gate_rejects_a_blurred_board(sharp_board, sigma):
    T_cb, img = sharp_board
    blurred = cv2.GaussianBlur(img, (0, 0), sigma)
    m = measure_fiducial(blurred, K_TEST, None, BoardSpec(), T_EE_BOARD)
    sharp = measure_fiducial(img, K_TEST, None, BoardSpec(), T_EE_BOARD)
    # still detected, with all its corners, a good fit and a small covariance - only sharpness fails
    assert m.detected and m.corners >= 7 and not m.accepted
    assert m.reasons == [r for r in m.reasons if "sharpness" in r] and m.reasons, m.reasons
    assert m.sharpness < 0.2 * sharp.sharpness
    # and a little blur is fine
    assert measure_fiducial(cv2.GaussianBlur(img, (0, 0), 0.5), K_TEST, None, BoardSpec(), T_EE_BOARD).accepted


def test_gate_rejects_a_barely_visible_board(sharp_board):
    T_cb, img = sharp_board
    spec = BoardSpec()
    # far away: ~40 px across
    far = _render_board(_board_pose(2.6))
    m = measure_fiducial(far, K_TEST, None, spec, T_EE_BOARD)
    assert not m.accepted
    if m.detected:
        assert any("size" in r or "sigma" in r for r in m.reasons), m.reasons
    # half hidden: the corners that remain are too few
    occluded = img.copy()
    uv = (K_TEST @ (T_cb[:3, :3] @ np.array([spec.width / 2, spec.height / 2, 0]) + T_cb[:3, 3]))
    u_mid = int(uv[0] / uv[2])
    occluded[:, u_mid - 5:] = 140
    m = measure_fiducial(occluded, K_TEST, None, spec, T_EE_BOARD)
    assert not m.accepted
    if m.detected:
        assert any("corners" in r for r in m.reasons), m.reasons
    # a shrunk image (the same frame at a quarter of the resolution)
    small = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
    K_small = K_TEST.copy()
    K_small[:2] /= 4
    K_small[:2, 2] = (K_TEST[:2, 2] + 0.5) / 4 - 0.5
    assert not measure_fiducial(small, K_small, None, spec, T_EE_BOARD).accepted


# ----------------------------------------------------------------------------- filter vs smoother

def test_smoother_never_worse_than_filter_in_a_gap():
    rng = np.random.default_rng(0)
    N, d = 61, 6
    q = 0.002 ** 2 / 30  # random walk per frame
    r = 0.001 ** 2
    F = np.repeat(np.eye(d)[None], N, 0)
    Q = np.repeat(np.eye(d)[None] * q, N, 0)
    R = np.repeat(np.eye(d)[None] * r, N, 0)
    seen = np.zeros(N, bool)
    seen[:10] = seen[-10:] = True  # good frames on both sides of a 41-frame gap
    x0, P0 = np.zeros(d), np.eye(d) * 1.0
    mid = N // 2
    err_f, err_s = [], []
    for _ in range(300):
        truth = np.cumsum(rng.normal(0, math.sqrt(q), (N, d)), 0) + rng.normal(0, 0.01, d)
        z = np.where(seen[:, None], truth + rng.normal(0, math.sqrt(r), (N, d)), np.nan)
        xp, Pp, xf, Pf = kalman_filter(F, Q, z, R, x0, P0)
        xs, Ps = rts_smoother(F, xp, Pp, xf, Pf)
        err_f.append(np.sum((xf - truth) ** 2, 1))
        err_s.append(np.sum((xs - truth) ** 2, 1))
    err_f, err_s = np.mean(err_f, 0), np.mean(err_s, 0)
    # covariance: the smoother's is never larger than the filter's, at any frame
    for k in range(N):
        assert np.linalg.eigvalsh(Pf[k] - Ps[k]).min() > -1e-15
    # empirical error inside the gap: never worse, and much better in the middle
    assert np.all(err_s[10:-10] <= err_f[10:-10] * 1.05)
    assert err_s[mid] < 0.6 * err_f[mid]
    # and both are calibrated: the empirical error matches the predicted variance (300 runs x 6 dof)
    assert 0.8 < err_s[mid] / np.trace(Ps[mid]) < 1.25
    assert 0.8 < err_f[mid] / np.trace(Pf[mid]) < 1.25
    # the two-sided covariance peaks in the middle of the gap; the one-sided one grows to its end
    tr_s = np.trace(Ps, axis1=1, axis2=2)
    tr_f = np.trace(Pf, axis1=1, axis2=2)
    assert abs(int(np.argmax(tr_s)) - mid) <= 1
    assert np.all(np.diff(tr_f[10:-10]) > 0)


# ----------------------------------------------------------------------------- unlabelled frames

def _toy_fk(q):
    """A 'robot' whose hand pose is its joint vector: t = q[:3], R = Exp(q[3:6]); J = identity."""
    T = np.repeat(np.eye(4)[None], len(q), 0)
    for i, qi in enumerate(q):
        T[i, :3, :3] = cv2.Rodrigues(np.ascontiguousarray(qi[3:6]))[0]
        T[i, :3, 3] = qi[:3]
    return T, np.repeat(np.eye(6)[None], len(q), 0)


def _toy_sequence(N=180, fps=30.0, seed=1):
    rng = np.random.default_rng(seed)
    t = np.arange(N) / fps
    q = np.c_[0.3 * np.sin(t[:, None] * [1.0, 0.7, 0.4]), 0.2 * np.cos(t[:, None] * [0.5, 0.9, 0.3])]
    S = pose_perturb(np.eye(4), np.array([0.1, -0.2, 1.5, 0.1, 0.2, -0.1]))  # T_camera_base
    T_base, _ = _toy_fk(q)
    T_true = S[None] @ T_base
    T_fid = np.array([pose_perturb(T, rng.normal(0, [0.001] * 3 + [0.002] * 3)) for T in T_true])
    cov = np.repeat(np.diag([0.001 ** 2] * 3 + [0.002 ** 2] * 3)[None], N, 0)
    return t, q, T_true, T_fid, cov


def test_frames_without_a_good_neighbour_are_left_unlabelled():
    t, q, T_true, T_fid, cov = _toy_sequence()
    cfg = InterpolationConfig(joint_model="none", max_gap_s=2.0)
    good = np.zeros(len(t), bool)
    good[[3, 6, 9, 12]] = True  # good frames only in the first 0.4 s
    res = interpolate_sequence(t, q, _toy_fk, good, T_fid, cov, cfg)
    for k in range(len(t)):
        if t[k] - t[12] > 2.0:
            assert res.mode[k] is None and np.all(np.isnan(res.T_label[k])) and np.all(np.isnan(res.label_cov[k]))
        else:
            assert res.mode[k] is not None and np.all(np.isfinite(res.T_label[k]))
    assert [res.mode[k] for k in (0, 3, 5, 30)] == ["backward", "fiducial", "two_sided", "forward"]
    # the label's uncertainty grows with the distance from the last good frame
    tr = [np.trace(res.label_cov[k][:3, :3]) for k in range(13, len(t)) if res.mode[k] is not None]
    assert np.all(np.diff(tr) > 0) and tr[-1] > 4 * tr[0]
    # labels near the good frames are close to the truth (the toy kinematics is exact)
    assert np.linalg.norm(res.T_label[20][:3, 3] - T_true[20][:3, 3]) < 0.003
    # no good frame at all, or too few to trust: nothing is labelled
    for g in (np.zeros(len(t), bool), np.eye(1, len(t), 40, dtype=bool)[0]):
        res = interpolate_sequence(t, q, _toy_fk, g, T_fid, cov, cfg)
        assert all(m is None for m in res.mode) and np.all(np.isnan(res.T_label))


def test_motion_direction_ignores_noise_and_follows_reversals():
    rng = np.random.default_rng(3)
    x = np.r_[np.linspace(0, 0.1, 50), np.full(30, 0.1), np.linspace(0.1, 0.05, 40)]
    noisy = x + rng.normal(0, 0.0005, len(x))
    s = motion_direction(noisy[:, None], np.array([0.008]))[:, 0]
    assert s[0] == 0 and s[45] == 1 and s[75] == 1 and s[-1] == -1
    assert np.count_nonzero(np.diff(s)) == 2  # 0 -> +1 -> -1, no flicker while holding still


# ----------------------------------------------------------------------------- COCO

def test_coco_round_trip(tmp_path):
    names = ["base", "elbow", "hand", "finger_left"]
    uv = np.array([[10.0, 20.0], [np.nan, np.nan], [300.25, 200.75], [305.0, 190.0]])
    images = [{"file_name": "seq_00000/images/000003.png", "width": 640, "height": 480, "uv": uv,
               "visible": [True, False, True, False]}]
    coco_names = ["root", "elbow", "hand", "finger_left"]  # the annotation tool called the base "root"
    path = write_coco_keypoints(tmp_path / "k.json", images, coco_names)
    data = json.loads(path.read_text())
    flat = data["annotations"][0]["keypoints"]
    assert flat[:3] == [10.5, 20.5, 2] and flat[3:6] == [0.0, 0.0, 0]  # COCO pixel convention, v flags
    labels = load_coco_keypoints(path, names, parse_keypoint_map("root=base"))
    lab = labels["seq_00000/images/000003.png"]
    assert lab["names"] == names and lab["source"] == "coco"
    assert np.allclose(lab["uv"][0], [10.0, 20.0]) and np.allclose(lab["uv"][2], [300.25, 200.75])
    assert lab["uv"][1] is None and lab["labelled"] == [True, False, True, True]
    assert lab["visible"] == [True, None, True, False]
    # without the map, "root" is not a robot keypoint and stays unlabelled
    assert load_coco_keypoints(path, names)["seq_00000/images/000003.png"]["uv"][0] is None
    with pytest.raises(ValueError):
        parse_keypoint_map("root")


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from pose_estimator.sim import GeneratorConfig, generate_dataset
    from pose_estimator.sim.config import CameraConfig

    root = tmp_path_factory.mktemp("gt") / "ds"
    # the labeller's evaluation settings (label_eval.yaml): a camera facing the 5x5 board from 0.6-1.5 m
    cfg = GeneratorConfig(sequences=2, frames_per_sequence=30, seed=3, width=640, height=480,
                          camera=CameraConfig(board_facing_probability=1.0, distance=(0.6, 1.5)),
                          board=BoardSpec(squares_x=5, squares_y=5))
    generate_dataset(cfg, root, workers=1, progress=False)
    return root


def test_label_end_to_end(tiny_dataset, tmp_path, capsys):
    from pose_estimator.groundtruth.cli import main

    root = tiny_dataset
    # human labels for one frame, merged into its label record
    names = json.loads((root / "meta.json").read_text())["keypoint_names"]
    uv = np.full((len(names), 2), np.nan)
    uv[0] = [100.0, 120.0]
    coco = write_coco_keypoints(tmp_path / "human.json", [{"file_name": "seq_00001/images/000002.png", "width": 640,
                                                           "height": 480, "uv": uv}], names)
    assert main(["label", str(root), "--json", "--coco", str(coco)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("frames", "fiducial", "interpolated", "unlabelled", "fiducial_pos_err_mm_median",
                "interpolated_pos_err_mm_median", "interpolated_rot_err_deg_median", "kinematic_pos_err_mm_median",
                "coverage95"):
        assert key in out, key
    assert out["frames"] == 60 and out["fiducial"] + out["interpolated"] + out["unlabelled"] == 60
    assert out["fiducial"] > 0 and out["keypoint_labels"] == 1
    assert out["kinematic_pos_err_mm_median"] > 2.0
    summary = json.loads((root / "labels.json").read_text())
    assert summary["frames"] == 60 and set(summary["sequences"]) == {"seq_00000", "seq_00001"}
    for seq in ("seq_00000", "seq_00001"):
        rows = [json.loads(x) for x in (root / seq / "labels.jsonl").read_text().splitlines()]
        assert len(rows) == 30 and [r["index"] for r in rows] == list(range(30))
        for r in rows:
            if r["source"] is None:
                assert r["ee_pose_camera"] is None and r["ee_covariance"] is None
            else:
                C = np.asarray(r["ee_covariance"]).reshape(6, 6)
                assert len(r["ee_pose_camera"]) == 7 and np.linalg.eigvalsh(0.5 * (C + C.T)).min() > 0
                assert (r["source"] == "fiducial") == r["fiducial"]["accepted"]
    row = json.loads((root / "seq_00001" / "labels.jsonl").read_text().splitlines()[2])
    assert row["keypoints"]["source"] == "coco" and np.allclose(row["keypoints"]["uv"][0], [100.0, 120.0])
    # labelled frames beat kinematics alone
    if out["interpolated_pos_err_mm_median"] is not None:
        assert out["interpolated_pos_err_mm_median"] < out["kinematic_pos_err_mm_median"]


def test_plot_labels(tiny_dataset, tmp_path):
    from pose_estimator.groundtruth.cli import main

    png = tmp_path / "labels.png"
    assert main(["plot-labels", str(tiny_dataset), "--sequence", "0", "--out", str(png)]) == 0
    img = cv2.imread(str(png))
    assert img is not None and img.shape[0] > 300 and img.shape[1] > 500
    assert main(["plot-labels", str(tiny_dataset), "--sequence", "7", "--out", str(png)]) == 1
