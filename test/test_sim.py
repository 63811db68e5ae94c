"""Synthetic data generator: geometry agrees with the kinematics, labels agree with the pixels,
the error model lies the way it should, output is reproducible, resumable and readable (dataset and bag).

Everything renders tiny images (<= 320x256, a few frames) so the file runs in well under a minute.
"""

import argparse
import math
import shutil

import cv2
import numpy as np
import pytest
import torch

from pose_estimator.robot import RobotModel
from pose_estimator.sim import (GeneratorConfig, JointErrorModel, SyntheticDataset, add_contact_sheet_arguments,
                                add_generate_arguments, apply_joint_errors, cli_contact_sheet, cli_generate,
                                config_from_dict, detect_board, generate_dataset, play_operator,
                                sample_joint_errors, sample_trajectory)
from pose_estimator.sim.camera import SimCamera, distort_normalized, look_at_optical, project_points
from pose_estimator.sim.config import TrajectoryConfig
from pose_estimator.sim.scene import LABEL_BOARD, LABEL_OTHER, Lighting, SimScene

LIGHT = Lighting((0.4, 0.3, 1.0), (1, 1, 1), 0.6, 0.5, 0.1, False)


def small_config(**overrides) -> GeneratorConfig:
    data = {"sequences": 2, "frames_per_sequence": 3, "seed": 7, "width": 160, "height": 128}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    return config_from_dict(GeneratorConfig, data)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A small dataset with bags, made through the CLI hook (as `pose-estimator generate` would)."""
    out = tmp_path_factory.mktemp("sim") / "ds"
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(["--out", str(out), "--sequences", "2", "--frames-per-sequence", "3", "--seed", "7",
                              "--width", "160", "--height", "128", "--bag", "--workers", "1", "--no-progress"])
    assert cli_generate(args) == 0
    return out


@pytest.fixture(scope="module")
def scene(panda):
    s = SimScene(panda.definition, panda.joint_names, None)
    yield s
    s.close()


# ------------------------------------------------------------------ geometry
def test_pybullet_link_frames_and_keypoints_equal_robot_model_fk(panda, scene):
    from pose_estimator import robot
    from pose_estimator.sim import scene as sim_scene

    assert sim_scene.WORLD == robot.WORLD  # repeated there to keep torch out of worker processes
    q = panda.random_configuration(6, generator=torch.Generator().manual_seed(0))
    kp_fk = panda.keypoints_3d(q).numpy()
    for b in range(q.shape[0]):
        scene.set_joints(q[b].numpy())
        TL = scene.link_poses_world()
        np.testing.assert_allclose(scene.keypoints_world(TL), kp_fk[b], atol=1e-5)
        for e, name in enumerate(scene.link_names):
            np.testing.assert_allclose(TL[e], panda.link_pose(q[b:b + 1], name)[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("dist", [np.zeros(5), np.array([-0.2, 0.03, 0.001, -0.001, 0.0])])
def test_rendered_sphere_lands_where_opencv_projects_it(scene, dist):
    """The renderer's projection matrix and the distortion remap agree with OpenCV's projection
    (centre of pixel (0, 0) at (0, 0)), to a fraction of a pixel."""
    W, H = 160, 128
    cam = SimCamera(np.array([[150.0, 0, 83.3], [0, 151.0, 60.7], [0, 0, 1]]), dist, W, H)
    T_wc = look_at_optical(np.array([2.0, 0.4, 1.5]), np.array([0.0, 0.0, 0.4]))
    scene.set_joints(np.zeros(len(scene.joint_names)).clip(scene.joint_lower, scene.joint_upper))
    K_r, W_r, H_r, mx, my = cam.render_setup()
    for uv_target in [(40.0, 30.0), (120.0, 95.0), (80.0, 64.0)]:
        # A sphere centred 1.2 m along the ray through the (undistorted) pixel uv_target.
        ray = np.linalg.inv(cam.K) @ np.array([*uv_target, 1.0])
        p_cam = ray / np.linalg.norm(ray) * 1.2
        scene.clear_distractors()
        scene.add_primitive("sphere", np.array([0.03, 0, 0]), (T_wc @ np.r_[p_cam, 1])[:3], np.array([0, 0, 0, 1.0]),
                            [1, 0, 0, 1])
        _, _, labels = scene.render(T_wc, K_r, W_r, H_r, 0.05, 8.0, LIGHT)
        expected = project_points(p_cam[None], cam)[0]
        if mx is None:
            ys, xs = np.nonzero(labels == LABEL_OTHER)
            # An ~8 px disc's centroid is its centre's projection up to perspective (< 0.1 px here).
            assert np.hypot(xs.mean() - expected[0], ys.mean() - expected[1]) < 0.2
        else:
            # The pinhole render's pixels, pushed through the lens model, centre on the projection ...
            ys, xs = np.nonzero(labels == LABEL_OTHER)
            f = np.diag(cam.K)[:2]
            fwd = distort_normalized((np.c_[xs, ys] - K_r[:2, 2]) / f, dist) * f + cam.K[:2, 2]
            assert np.linalg.norm(fwd.mean(0) - expected) < 0.15
            # ... and so does the remapped (distorted) mask, up to nearest-neighbour resampling of a small disc
            # (a remap in the wrong direction would be off by twice the ~1.3 px distortion at the corners).
            ys, xs = np.nonzero(cv2.remap(labels, mx, my, cv2.INTER_NEAREST) == LABEL_OTHER)
            assert np.hypot(xs.mean() - expected[0], ys.mean() - expected[1]) < 0.4
    scene.clear_distractors()


def test_each_visible_keypoint_lands_on_its_link_in_the_mask(dataset_dir, scene):
    ds = SyntheticDataset(dataset_dir)
    labels = {int(k): v for k, v in ds.meta["mask_labels"].items()}
    assert labels[1] == "panda_link0"
    n_in = n_vis = 0
    for f in (ds[i] for i in range(len(ds))):
        H, W = f.mask.shape
        for k in range(len(ds.keypoint_names)):
            u, v = f.keypoints_2d[k]
            inside = -0.5 <= u < W - 0.5 and -0.5 <= v < H - 0.5 and f.keypoints_depth[k] > 0
            assert bool(f.keypoints_in_image[k]) == inside
            n_in += inside
            if f.keypoints_visible[k]:
                n_vis += 1
                # Its pixel shows its own link or one joined to it (visibility's definition, checked
                # against the stored mask rather than the generator's own buffers).
                assert int(f.mask[int(math.floor(v + 0.5)), int(math.floor(u + 0.5))]) in scene.kp_labels[k]
    # A misregistered projection would put most points on the background: demand the usual ~half.
    assert n_in > 20 and n_vis / n_in > 0.35, (n_vis, n_in)


def test_distorted_sequences_keep_keypoints_on_their_links(tmp_path, scene):
    cfg = small_config(sequences=1, camera={"distortion_probability": 1.0, "k1": [-0.25, -0.15]},
                       scene={"distractors": [0, 0], "occluder_probability": 0.0})
    ds = SyntheticDataset(generate_dataset(cfg, tmp_path / "d", workers=1, progress=False))
    assert ds.sequences()[0].dist[0] < -0.1
    hits = total = 0
    for f in (ds[i] for i in range(len(ds))):
        for k in np.flatnonzero(f.keypoints_in_image):
            u, v = f.keypoints_2d[k]
            total += 1
            # Nothing but the arm and its board is in the scene: a keypoint's pixel shows its link,
            # or the board hiding it; a misplaced projection lands on the background.
            label = int(f.mask[int(math.floor(v + 0.5)), int(math.floor(u + 0.5))])
            hits += label in scene.kp_labels[k] | {LABEL_BOARD}
    assert total > 10 and hits / total > 0.7, (hits, total)


# --------------------------------------------------------------- joint errors
def test_backlash_lags_against_the_direction_of_motion_with_hysteresis():
    t = np.linspace(0, 4, 801)
    x = np.sin(t * math.pi / 2)[:, None] * 0.5  # up, reversal at t=1, down, reversal at t=3
    b = math.radians(1.0)
    y = play_operator(x, np.array([b]))
    v = np.gradient(x[:, 0], t)
    steady = (np.abs(v) > 0.05) & (np.abs(t - 1) > 0.2) & (np.abs(t - 3) > 0.2) & (t > 0.2)
    np.testing.assert_allclose((y - x)[steady, 0], -np.sign(v[steady]) * b / 2, atol=1e-12)
    # Hysteresis: just after a reversal the measured value stays put until the joint has moved b back.
    rev = np.argmax(x[:, 0])
    still = np.abs(x[rev:, 0] - x[rev, 0]) < b
    assert np.ptp(y[rev:][still[: len(y) - rev]]) < 1e-12


def test_error_model_statistics_and_end_effector_error_of_one_to_three_cm(panda):
    rng = np.random.default_rng(0)
    revolute = np.array([True] * 7 + [False] * 2)
    errs = [sample_joint_errors(JointErrorModel(), revolute, rng) for _ in range(400)]
    off = np.stack([e.offset for e in errs])
    assert abs(off[:, :7].std() - math.radians(JointErrorModel().offset_std_deg)) < math.radians(0.08)
    assert np.all(off[:, 7:] == 0)
    bl = np.stack([e.backlash for e in errs])[:, :7]
    assert math.radians(0.5) <= bl.min() and bl.max() <= math.radians(1.0)
    # Measured joints along real trajectories -> kinematic end-effector error.
    lo, hi = panda.joint_lower.numpy(), panda.joint_upper.numpy()
    q_true, q_meas = [], []
    for e in errs[:40]:
        traj = sample_trajectory(lo, hi, 3.0, TrajectoryConfig(), rng, revolute)
        qt, _ = traj(np.arange(0, 3.0, 1 / 120))
        qm = apply_joint_errors(qt, e, rng)
        q_true.append(qt[::30])
        q_meas.append(qm[::30])
    qt, qm = torch.as_tensor(np.concatenate(q_true)), torch.as_tensor(np.concatenate(q_meas))
    d = (panda.ee_pose(qt)[:, :3, 3] - panda.ee_pose(qm)[:, :3, 3]).norm(dim=-1).numpy()
    assert 0.01 <= float(np.median(d)) <= 0.03, np.median(d)


def test_recorded_measured_joints_follow_the_model(dataset_dir):
    ds = SyntheticDataset(dataset_dir)
    for seq in ds.sequences():
        js = seq.joint_stream()
        errs = seq.info["joint_errors"]
        b, off = np.array(errs["backlash"]), np.array(errs["offset"])
        resid = js["measured"] - off - js["position"]  # = backlash lag + noise
        assert np.all(np.abs(resid[:, :7]) <= b[:7] / 2 + 5 * math.radians(0.07))
        moving = np.abs(js["velocity"][:, :7]) > 0.2
        if moving.sum() > 20:
            # Where a joint moves fast, the lag has the opposite sign of its velocity.
            agree = np.sign(resid[:, :7][moving]) == -np.sign(js["velocity"][:, :7][moving])
            assert agree.mean() > 0.8


# --------------------------------------------------------- format and reader
def test_reader_returns_numpy_fields_and_sequences(dataset_dir):
    ds = SyntheticDataset(dataset_dir)
    assert len(ds) == 6 and [s.name for s in ds.sequences()] == ["seq_00000", "seq_00001"]
    f = ds[4]
    assert f.sequence == "seq_00001" and f.index == 1
    assert f.image.shape == (128, 160, 3) and f.image.dtype == np.uint8
    K = len(ds.keypoint_names)
    assert f.keypoints_2d.shape == (K, 2) and f.keypoints_3d.shape == (K, 3) and f.keypoints_visible.dtype == bool
    assert f.link_poses.shape == (len(ds.link_names), 4, 4)
    # Poses are consistent: ee in camera = inv(T_base_camera) @ ee in base; board = ee @ T_ee_board.
    np.testing.assert_allclose(f.T_camera_base @ f.ee_pose, f.ee_pose_camera, atol=1e-9)
    np.testing.assert_allclose(f.ee_pose_camera @ ds.T_ee_board, f.board_pose_camera, atol=1e-9)
    ee = ds.link_names.index(ds.meta["robot"]["end_effector"])
    np.testing.assert_allclose(f.link_poses[ee], f.ee_pose, atol=1e-9)
    assert f.stamp_ns == ds.sequences()[1].info["start_stamp_ns"] + round(1e9 / 30)
    meta = ds.meta
    for key in ("format_version", "robot", "keypoint_names", "board", "joint_error_model", "seed", "settings"):
        assert key in meta


def test_same_seed_gives_identical_output_whatever_the_worker_count(tmp_path):
    cfg = small_config(frames_per_sequence=2, width=96, height=80, bag=True)
    a = generate_dataset(cfg, tmp_path / "a", workers=1, progress=False)
    b = generate_dataset(cfg, tmp_path / "b", workers=2, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = generate_dataset(small_config(frames_per_sequence=2, width=96, height=80, seed=8), tmp_path / "c",
                         workers=1, progress=False)
    assert (c / "seq_00000/frames.jsonl").read_bytes() != (a / "seq_00000/frames.jsonl").read_bytes()


def test_interrupted_output_never_looks_complete_and_rerun_resumes(tmp_path):
    cfg = small_config(frames_per_sequence=2, width=96, height=80)
    root = generate_dataset(cfg, tmp_path / "r", workers=1, progress=False)
    seq0_mtime = (root / "seq_00000" / "frames.jsonl").stat().st_mtime_ns
    reference = (root / "seq_00001" / "frames.jsonl").read_bytes()
    # Simulate a crash: the marker gone, one sequence missing, a half-written one left behind.
    (root / "COMPLETE").unlink()
    shutil.rmtree(root / "seq_00001")
    (root / ".tmp-seq_00001-12345" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete"):
        SyntheticDataset(root)
    assert len(SyntheticDataset(root, require_complete=False)) == 2  # only the finished sequence
    generate_dataset(cfg, root, workers=1, progress=False)
    assert (root / "COMPLETE").is_file() and not list(root.glob(".tmp-*"))
    assert (root / "seq_00000" / "frames.jsonl").stat().st_mtime_ns == seq0_mtime  # skipped, not redone
    assert (root / "seq_00001" / "frames.jsonl").read_bytes() == reference
    # More sequences extend the dataset; other settings are refused.
    generate_dataset(small_config(frames_per_sequence=2, width=96, height=80, sequences=3), root, workers=1,
                     progress=False)
    assert len(SyntheticDataset(root).sequences()) == 3
    with pytest.raises(ValueError, match="different settings"):
        generate_dataset(small_config(frames_per_sequence=2, width=96, height=80, seed=1), root, progress=False)


# ------------------------------------------------------------------------ bag
def test_bag_has_topics_counts_stamps_and_measured_joints_at_image_stamps(dataset_dir):
    from rosbags.rosbag2 import Reader

    from pose_estimator.sim.bag import typestore

    ts = typestore()
    ds = SyntheticDataset(dataset_dir)
    seq = ds.sequences()[0]
    F, N = seq.num_frames, seq.info["num_joint_samples"]
    expected = {"/camera/image_raw": ("sensor_msgs/msg/Image", F),
                "/camera/camera_info": ("sensor_msgs/msg/CameraInfo", F),
                "/joint_states": ("sensor_msgs/msg/JointState", N), "/tf_static": ("tf2_msgs/msg/TFMessage", 1),
                "/robot_description": ("std_msgs/msg/String", 1),
                "/ground_truth/joint_states": ("sensor_msgs/msg/JointState", N),
                "/ground_truth/ee_pose": ("geometry_msgs/msg/PoseStamped", F),
                "/ground_truth/board_pose": ("geometry_msgs/msg/PoseStamped", F)}
    msgs: dict[str, list] = {}
    with Reader(seq.bag_path) as reader:
        assert {c.topic: (c.msgtype, c.msgcount) for c in reader.connections} == expected
        last = -1
        for conn, t, raw in reader.messages():
            assert t >= last
            last = t
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            if hasattr(msg, "header"):
                assert msg.header.stamp.sec * 10 ** 9 + msg.header.stamp.nanosec == t
            msgs.setdefault(conn.topic, []).append((t, msg))
    assert (N - 1) / ((msgs["/joint_states"][-1][0] - msgs["/joint_states"][0][0]) / 1e9) >= 100  # >= 100 Hz
    joints = {t: m for t, m in msgs["/joint_states"]}
    for i, (t, img) in enumerate(msgs["/camera/image_raw"]):
        f = seq.frame(i)
        assert t == f.stamp_ns and img.encoding == "rgb8" and img.header.frame_id == "camera_optical_frame"
        np.testing.assert_array_equal(img.data.reshape(img.height, img.width, 3), f.image)
        js = joints[t]  # a joint-state sample at every image stamp
        assert list(js.name) == ds.joint_names
        np.testing.assert_allclose(js.position, f.joints_measured, atol=1e-6)
        info = msgs["/camera/camera_info"][i][1]
        np.testing.assert_allclose(info.k.reshape(3, 3), f.K)
        np.testing.assert_allclose(info.d, f.dist)
        gt = msgs["/ground_truth/ee_pose"][i][1].pose.position
        np.testing.assert_allclose([gt.x, gt.y, gt.z], f.ee_pose_camera[:3, 3], atol=1e-9)
    tf = msgs["/tf_static"][0][1].transforms[0]
    assert (tf.header.frame_id, tf.child_frame_id) == ("panda_link0", "camera_optical_frame")
    p = tf.transform.translation
    np.testing.assert_allclose([p.x, p.y, p.z], seq.T_base_camera[:3, 3], atol=1e-9)
    assert "<robot" in msgs["/robot_description"][0][1].data


# ---------------------------------------------------------------------- board
def test_board_facing_the_camera_is_detected_and_its_pose_matches_to_a_few_mm(tmp_path):
    cfg = small_config(sequences=2, frames_per_sequence=3, width=640, height=480, seed=5,
                       camera={"distance": [0.8, 0.85], "view_width": [0.5, 0.6], "board_facing_probability": 1.0,
                               "board_facing_cone_deg": 15.0, "distortion_probability": 0.0},
                       scene={"blur_probability": 0.0, "occluder_probability": 0.0, "distractors": [0, 0]})
    ds = SyntheticDataset(generate_dataset(cfg, tmp_path / "b", workers=1, progress=False))
    spec = ds.board_spec()
    found = []
    for f in (ds[i] for i in range(len(ds))):
        det = detect_board(f.image, f.K, f.dist, spec)
        if det.T_camera_board is not None:
            T = det.T_camera_board
            found.append((np.linalg.norm(T[:3, 3] - f.board_pose_camera[:3, 3]),
                          math.degrees(math.acos(np.clip((np.trace(T[:3, :3].T @ f.board_pose_camera[:3, :3]) - 1) / 2,
                                                         -1, 1)))))
        assert f.board_visible or det.T_camera_board is None
    assert found, "board never detected"
    t_err, r_err = min(found)
    assert t_err < 0.005 and r_err < 2.0, found


# ------------------------------------------------------------- another robot
def test_a_second_robot_needs_only_a_yaml(tmp_path):
    yaml_path = tmp_path / "iiwa.yaml"
    yaml_path.write_text(
        "format_version: 1\nname: iiwa\nurdf: pybullet_data://kuka_iiwa/model.urdf\nbase_link: lbr_iiwa_link_0\n"
        "end_effector: lbr_iiwa_link_7\nkeypoints:\n"
        + "".join(f"  - {{name: j{i}, link: lbr_iiwa_link_{i}, offset: [0.0, 0.0, 0.0]}}\n" for i in range(8))
        + "  - {name: tip, link: lbr_iiwa_link_7, offset: [0.0, 0.0, 0.05]}\n")
    root = generate_dataset(small_config(robot=str(yaml_path), sequences=1), tmp_path / "iiwa", workers=1,
                            progress=False)
    ds = SyntheticDataset(root)
    assert len(ds) == 3 and ds.meta["robot"]["name"] == "iiwa" and len(ds.joint_names) == 7
    model = RobotModel.from_yaml(yaml_path)
    f = ds[1]
    np.testing.assert_allclose(model.keypoints_3d(torch.as_tensor(f.joints_true)[None])[0].numpy(),
                               f.keypoints_3d, atol=1e-5)
    assert f.keypoints_in_image.any()


# ------------------------------------------------------------- contact sheet
def test_contact_sheet_cli_writes_an_image(dataset_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_contact_sheet_arguments(parser)
    out = tmp_path / "sheet.png"
    assert cli_contact_sheet(parser.parse_args([str(dataset_dir), "--out", str(out), "--frames", "4"])) == 0
    img = cv2.imread(str(out))
    assert img is not None and img.shape[0] >= 2 * 128 and img.shape[1] >= 2 * 160
