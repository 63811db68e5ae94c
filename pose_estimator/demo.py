"""The main job's demo.

:func:`run_node_demo` (``pose-estimator demo``, ``make demo``): render a
recording of the simulated Panda whose joint sensors lie, play it into the
ROS 2 node with the shipped model, and score what the node publishes against
the ground truth.

:func:`run_solver_demo` (``pose-estimator demo --solver-only``) needs no
network and no ROS: the Panda's
keypoints are projected from its *true* joints into a camera, corrupted the
way a heat-map detector's output is (heteroscedastic noise it reports, plus
gross outliers it does not), and the solver, seeded by the *measured* (wrong)
joints, recovers the end-effector pose. The table compares kinematics alone
with the solver in both modes, and checks the reported covariance against
the actual error.
"""

from __future__ import annotations

import json
import math
import time

import torch

from .geometry import rotation_angle, so3_log
from .robot import RobotModel
from .solver import SolverConfig, solve
from .synthetic import add_keypoint_noise, look_at, perturb_pose

__all__ = ["run_solver_demo", "run_node_demo"]

CHI2_6_95 = 12.5916  # 95 % quantile of chi-square with 6 dof
CHI2_3_95 = 7.8147


def _sloppy_scenes(robot: RobotModel, n: int, g: torch.Generator):
    D = torch.float64
    q_true = robot.random_configuration(n, generator=g, margin=0.15)
    arm = torch.tensor([not n.startswith(("panda_finger",)) for n in robot.joint_names])
    # Joint error of a cheap arm: a constant offset per joint plus slack and noise.
    err = torch.randn(n, robot.n_joints, generator=g, dtype=D) * math.radians(0.8)
    err += torch.sign(torch.randn(n, robot.n_joints, generator=g, dtype=D)) * math.radians(0.4)
    err = err * arm
    q_meas = q_true + err
    target = torch.tensor([0.0, 0.0, 0.45], dtype=D) + 0.1 * torch.randn(n, 3, generator=g, dtype=D)
    az = torch.rand(n, generator=g, dtype=D) * 2 * math.pi
    r = 0.8 + 1.7 * torch.rand(n, generator=g, dtype=D)
    eye = torch.stack([r * torch.cos(az), r * torch.sin(az), 0.3 + 0.9 * torch.rand(n, generator=g, dtype=D)], -1)
    T_cb = look_at(eye, target)
    return q_true, q_meas, T_cb


def run_solver_demo(robot_name: str = "panda", frames: int = 200, seed: int = 0, as_json: bool = False) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    D = torch.float64
    robot = RobotModel.from_yaml(robot_name)
    n = frames
    q_true, q_meas, T_cb = _sloppy_scenes(robot, n, g)
    width, height, f = 640, 480, 600.0
    K = torch.tensor([[f, 0, (width - 1) / 2], [0, f, (height - 1) / 2], [0, 0, 1]], dtype=D)
    P = robot.keypoints_3d(q_true)
    pc = P @ T_cb[:, :3, :3].transpose(-1, -2) + T_cb[:, None, :3, 3]
    uv_true = torch.stack([pc[..., 0] / pc[..., 2] * f + K[0, 2], pc[..., 1] / pc[..., 2] * f + K[1, 2]], -1)
    Kp = robot.num_keypoints
    # What a detector reports: 1-4 px sigma per point (it says so), 5 % gross failures (it does not).
    sigma = 1.0 + 3.0 * torch.rand(n, Kp, generator=g, dtype=D)
    uv, cov, outliers = add_keypoint_noise(uv_true, sigma, generator=g, outlier_fraction=0.05, outlier_px=50)
    in_image = (uv[..., 0] >= 0) & (uv[..., 0] < width) & (uv[..., 1] >= 0) & (uv[..., 1] < height) & (pc[..., 2] > 0.1)

    T_ce_true = T_cb @ robot.ee_pose(q_true)
    # The extrinsic the user calibrated is a little off too.
    T_cb_seed = perturb_pose(T_cb, 0.01, math.radians(0.5), generator=g)
    T_ce_kin_seeded = T_cb_seed @ robot.ee_pose(q_meas)

    cfg = SolverConfig()
    t0 = time.perf_counter()
    art = solve("articulated", uv, cov, K, robot=robot, joints=q_meas, initial_camera_from_base=T_cb_seed,
                joint_sigma=math.radians(0.9), camera_prior_sigma=(0.01, math.radians(0.5)), mask=in_image,
                config=cfg)
    t_art = (time.perf_counter() - t0) * 1e3 / n
    idx = robot.definition.rigid_indices()
    P_ee = robot.keypoints_in_ee(q_meas, idx)
    t0 = time.perf_counter()
    rig = solve("rigid", uv[:, idx], cov[:, idx], K, points=P_ee, initial_pose=T_ce_kin_seeded,
                mask=in_image[:, idx], config=cfg)
    t_rig = (time.perf_counter() - t0) * 1e3 / n

    def pos_err(T):
        return (T[:, :3, 3] - T_ce_true[:, :3, 3]).norm(dim=-1) * 1000

    def rot_err(T):
        return rotation_angle(T[:, :3, :3], T_ce_true[:, :3, :3]).rad2deg()

    def coverage(sol):
        e = torch.cat([sol.pose[:, :3, 3] - T_ce_true[:, :3, 3],
                       so3_log(sol.pose[:, :3, :3] @ T_ce_true[:, :3, :3].transpose(-1, -2))], -1)[..., None]
        m2 = (e.transpose(-1, -2) @ torch.linalg.inv(sol.covariance) @ e)[:, 0, 0]
        ep = e[:, :3]
        m2p = (ep.transpose(-1, -2) @ torch.linalg.inv(sol.covariance[:, :3, :3]) @ ep)[:, 0, 0]
        ok = sol.converged
        return float((m2[ok] < CHI2_6_95).float().mean()), float((m2p[ok] < CHI2_3_95).float().mean())

    rows = []
    for name, T, ok in [("kinematics (measured joints)", T_ce_kin_seeded, torch.ones(n, dtype=torch.bool)),
                        ("solver, articulated", art.pose, art.converged),
                        ("solver, rigid (hand only)", rig.pose, rig.converged)]:
        pe, re = pos_err(T)[ok], rot_err(T)[ok]
        rows.append((name, float(ok.float().mean()), float(pe.median()), float(pe.quantile(0.9)), float(re.median())))
    cov_art, cov_art_pos = coverage(art)
    cov_rig, cov_rig_pos = coverage(rig)

    print("pose_estimator demo: solver on synthetic Panda keypoints")
    print("  (image -> network -> keypoints lands with the trained model; here keypoints are the true")
    print(f"   projections plus reported 1-4 px noise and {float(outliers.float().mean()) * 100:.0f} % unreported outliers;"
          " joints carry offset + slack)")
    print(f"  {n} frames, {Kp} keypoints, camera 0.8-2.5 m, {width}x{height}\n")
    print(f"  {'estimate':<30}{'used':>6}{'pos med mm':>12}{'pos p90 mm':>12}{'rot med deg':>13}")
    for name, used, pm, p90, rm in rows:
        print(f"  {name:<30}{used:>6.2f}{pm:>12.2f}{p90:>12.2f}{rm:>13.3f}")
    print(f"\n  95% covariance ellipsoid coverage (6-DoF / position): articulated {cov_art:.2f} / {cov_art_pos:.2f},"
          f" rigid {cov_rig:.2f} / {cov_rig_pos:.2f}")
    print(f"  solver time per frame (batched): articulated {t_art:.2f} ms, rigid {t_rig:.2f} ms")
    result = {
        "frames": n,
        "kinematic_pos_err_mm_median": rows[0][2],
        "articulated_pos_err_mm_median": rows[1][2],
        "rigid_pos_err_mm_median": rows[2][2],
        "articulated_rot_err_deg_median": rows[1][4],
        "articulated_converged": rows[1][1],
        "rigid_converged": rows[2][1],
        "improvement_vs_kinematics": rows[0][2] / max(rows[1][2], 1e-9),
        "coverage95_articulated": cov_art,
        "coverage95_rigid": cov_rig,
        "ms_per_frame_articulated": t_art,
        "ms_per_frame_rigid": t_rig,
    }
    if as_json:
        print(json.dumps(result))
    return result


def run_node_demo(robot: str = "panda", model: str | None = None, out: str = "out/demo", frames: int = 150,
                  seed: int = 7, as_json: bool = False) -> int:
    """Generate (or reuse) one recorded sequence, play it into the node, print the comparison."""
    import os
    import sys
    from pathlib import Path

    from .robot import resource_dir

    model_path = Path(model) if model else resource_dir() / "models" / f"{Path(robot).stem}.safetensors"
    if not model_path.is_file():
        raise FileNotFoundError(f"no model at {model_path}: train one with `pose-estimator train` "
                                "(see README) or pass --model")
    # DDS stays on this machine, in a domain of its own, before rclpy is imported.
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["ROS_LOCALHOST_ONLY"] = "1"
    os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))

    # One torch thread in this process (the node runs in it): a second OpenMP team spins against
    # the DDS threads on a small CPU and frames back up.
    torch.set_num_threads(1)
    out_dir = Path(out)
    data = out_dir / "recording"
    print(f"[demo] recording: {data} ({frames} frames at 640x480, 30 Hz; reused when already there)", file=sys.stderr)
    # Rendering runs in a child process: pybullet and the generator's threads stay out of the node's process.
    import subprocess

    subprocess.run([sys.executable, "-m", "pose_estimator.sim", "generate", "--robot", robot, "--out", str(data),
                    "--sequences", "1", "--frames-per-sequence", str(frames), "--seed", str(seed), "--bag",
                    "--workers", "1", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    from .ros.run_recording import format_table, run_recording

    seq = sorted(p for p in data.iterdir() if p.name.startswith("seq_"))[0]
    print(f"[demo] playing {seq / 'bag'} into the node (model {model_path})", file=sys.stderr)
    # The recording's /tf_static carries the camera's extrinsic, as a calibrated rig's TF would.
    params = {"camera_extrinsic_from_tf": True, "torch_threads": 1,
              # a calibrated rig (config/calibrated_camera.yaml)
              "estimator.camera_prior_sigma_m": 0.005, "estimator.camera_prior_sigma_rad": 0.005}
    run = run_recording(seq, model_path, params=params, debug_dir=out_dir / "debug")
    print(format_table(run))
    if run.debug_images:
        print(f"debug frames: {', '.join(str(p) for p in run.debug_images)}")
    if as_json:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.summary().items()}))
    return 0 if run.published > 0 else 1
