"""Play a generated recording into the node and score what it published (the demo's main job).

:func:`run_recording` starts the node in-process (rclpy executor in a
thread, real DDS on loopback), plays a sequence's bag into it with
:class:`~pose_estimator.ros.player.BagPlayer`, collects ``~/pose``,
``~/status`` and (optionally) ``~/debug_image``, and compares against the
sequence's ground truth (``frames.jsonl``):

* **kinematics alone**: the measured joints through forward kinematics, put
  in the camera frame with the recorded extrinsic (a perfect hand-eye
  calibration) -- what the arm's own joint sensors say;
* **node**: the published ``PoseWithCovarianceStamped``.

:func:`format_table` prints the comparison; the caller (``pose-estimator
demo``) decides where the PNGs go. The environment must give the process
loopback-only discovery and its own ``ROS_DOMAIN_ID``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["RecordingRun", "run_recording", "format_table"]


@dataclass
class RecordingRun:
    frames: int  # images in the recording
    processed: int  # frames the node solved (pose or refusal)
    published: int  # poses published
    dropped: int  # frames skipped for a newer one
    kin_trans_mm: np.ndarray  # per published frame
    kin_rot_deg: np.ndarray
    node_trans_mm: np.ndarray
    node_rot_deg: np.ndarray
    within_3sigma: float  # share of published poses whose position error is inside the 3-sigma ellipsoid
    rate_hz: float  # frames solved per second of playback
    latency_ms_p50: float
    latency_ms_p95: float
    refusals: dict[str, int] = field(default_factory=dict)  # reason -> count
    debug_images: list[Path] = field(default_factory=list)

    def summary(self) -> dict:
        def med(a):
            return float(np.median(a)) if len(a) else float("nan")

        return {"frames": self.frames, "processed": self.processed, "published": self.published,
                "dropped": self.dropped, "kin_trans_mm_median": med(self.kin_trans_mm),
                "node_trans_mm_median": med(self.node_trans_mm), "kin_rot_deg_median": med(self.kin_rot_deg),
                "node_rot_deg_median": med(self.node_rot_deg), "within_3sigma": self.within_3sigma,
                "rate_hz": self.rate_hz, "latency_ms_p50": self.latency_ms_p50,
                "latency_ms_p95": self.latency_ms_p95}


def _T(pose7) -> np.ndarray:
    import torch

    from ..geometry import matrix_from_quaternion

    T = np.eye(4)
    T[:3, :3] = matrix_from_quaternion(torch.tensor(pose7[3:], dtype=torch.float64)).numpy()
    T[:3, 3] = pose7[:3]
    return T


def _errors(T_est: np.ndarray, T_true: np.ndarray) -> tuple[float, float]:
    dt = np.linalg.norm(T_est[:3, 3] - T_true[:3, 3]) * 1e3
    R = T_est[:3, :3].T @ T_true[:3, :3]
    ang = np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)))
    return float(dt), float(ang)


def run_recording(sequence: str | Path, model_path: str | Path, rate: float = 1.0,
                  params: dict | None = None, debug_dir: str | Path | None = None, debug_frames: int = 4,
                  timeout_s: float = 120.0) -> RecordingRun:
    """Play ``sequence`` (a generated ``seq_XXXXX`` folder with ``bag/``) into a fresh node; score it.

    Args:
        params: extra node parameters, e.g. ``{"camera_extrinsic_from_tf": True}``.
        debug_dir: where to write the first ``debug_frames`` debug images as PNG (None: none).
    """
    # Node, player and scorer share this interpreter, and the node's worker runs long stretches of
    # Python (the solver): at the default 5 ms switch interval each message callback may wait that
    # long for the interpreter, and at 150 messages/s the executor falls seconds behind.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    try:
        return _run_recording(sequence, model_path, rate, params, debug_dir, debug_frames, timeout_s)
    finally:
        sys.setswitchinterval(switch)


def _run_recording(sequence, model_path, rate, params, debug_dir, debug_frames, timeout_s) -> RecordingRun:
    import cv2
    import torch
    from geometry_msgs.msg import PoseWithCovarianceStamped
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image

    from pose_estimator.msg import EstimateStatus

    from ..robot import RobotModel
    from .image_conversion import image_msg_to_numpy
    from .node import PoseEstimatorNode
    from .player import BagPlayer
    from .testing import Collector, RosGraph, wait_for

    # The node runs in this process: torch ops on this thread (scoring) must not spin a second
    # OpenMP team against the node's worker and the DDS threads.
    torch.set_num_threads(1)
    seq = Path(sequence)
    meta = json.loads((seq / "sequence.json").read_text())
    frames = {f["stamp_ns"]: f for f in map(json.loads, (seq / "frames.jsonl").read_text().splitlines())}
    T_cb = np.linalg.inv(np.array(meta["camera"]["T_base_camera"]))
    overrides = {"model_path": str(model_path), "image_qos": "reliable", **(params or {})}
    remap = ["--ros-args", "-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"]
    with RosGraph(threads=3) as graph:
        node = graph.add(PoseEstimatorNode("pose_estimator", cli_args=remap, context=graph.context,
                                           parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()]))
        probe = graph.node("pose_estimator_scorer")
        poses, status, debug = Collector(), Collector(), Collector()
        probe.create_subscription(PoseWithCovarianceStamped, "/pose_estimator/pose", poses, 100)
        probe.create_subscription(EstimateStatus, "/pose_estimator/status", status, 100)
        if debug_dir is not None and debug_frames > 0:
            probe.create_subscription(Image, "/pose_estimator/debug_image", debug, 10)
        player_node = graph.node("pose_estimator_player")
        latched = BagPlayer(player_node, seq, topics=["/robot_description", "/tf_static"])
        latched.play()
        if not wait_for(lambda: node.estimator is not None, 30):
            raise RuntimeError("the node did not build its robot model")
        player = BagPlayer(player_node, seq, rate=rate, exclude=["/robot_description", "/tf_static"])
        player.wait_for_subscribers(["/camera/image_raw", "/camera/camera_info", "/joint_states"], 10)
        wait_for(lambda: node.status_pub.get_subscription_count() > 0, 10)
        t0 = time.monotonic()
        stats = player.play()
        n_images = stats.per_topic.get("/camera/image_raw", 0)
        c = node.counters
        # Wait for every image, or until none has arrived for 3 s (lost in transport: counted, not awaited).
        last = {"n": -1, "t": time.monotonic()}

        def settled() -> bool:
            if c.frames_received != last["n"]:
                last["n"], last["t"] = c.frames_received, time.monotonic()
            idle = node.frames_finished >= c.frames_processed and node._pending_frame is None
            return idle and (c.frames_received >= n_images or time.monotonic() - last["t"] > 3.0)

        wait_for(settled, timeout_s)
        solved = c.poses_published + c.poses_rejected
        wait_for(lambda: len(status) >= solved and len(poses) >= c.poses_published, 10)
        elapsed = max(time.monotonic() - t0, 1e-9)
        _, _, values = node.diagnostics_values()
        dropped = c.frames_dropped
        robot_name = node.config.robot
    robot = RobotModel.from_yaml(robot_name)
    kin_t, kin_r, node_t, node_r, inside = [], [], [], [], []
    for m in poses.snapshot():
        stamp = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
        f = frames.get(stamp)
        if f is None:
            continue
        T_true = _T(f["ee_pose_camera"])
        p, q = m.pose.pose.position, m.pose.pose.orientation
        T_node = _T([p.x, p.y, p.z, q.x, q.y, q.z, q.w])
        T_kin = T_cb @ robot.ee_pose(torch.tensor(f["joints_measured"], dtype=torch.float64)[None])[0].numpy()
        for (a, b), T in (((kin_t, kin_r), T_kin), ((node_t, node_r), T_node)):
            dt, dr = _errors(T, T_true)
            a.append(dt)
            b.append(dr)
        C = np.array(m.pose.covariance).reshape(6, 6)[:3, :3]
        e = T_node[:3, 3] - T_true[:3, 3]
        try:
            # "3 sigma" in 3-D: the chi-square(3 dof) quantile at the 1-D 3-sigma probability (99.73 %).
            inside.append(float(e @ np.linalg.solve(C, e)) <= 14.16)
        except np.linalg.LinAlgError:
            inside.append(False)
    refusals: dict[str, int] = {}
    for s in status.snapshot():
        if s.message:
            key = s.message.split(" (")[0][:80]
            refusals[key] = refusals.get(key, 0) + 1
    written = []
    if debug_dir is not None:
        out = Path(debug_dir)
        out.mkdir(parents=True, exist_ok=True)
        for k, img in enumerate(debug.snapshot()[:debug_frames]):
            path = out / f"debug_{k:02d}.png"
            cv2.imwrite(str(path), np.ascontiguousarray(image_msg_to_numpy(img)[..., ::-1]))
            written.append(path)
    return RecordingRun(
        frames=len(frames), processed=solved, published=len(node_t), dropped=dropped,
        kin_trans_mm=np.array(kin_t), kin_rot_deg=np.array(kin_r), node_trans_mm=np.array(node_t),
        node_rot_deg=np.array(node_r), within_3sigma=float(np.mean(inside)) if inside else float("nan"),
        rate_hz=solved / elapsed, latency_ms_p50=float(values["latency_ms_p50"]),
        latency_ms_p95=float(values["latency_ms_p95"]), refusals=refusals, debug_images=written)


def format_table(run: RecordingRun) -> str:
    """The comparison as a text table (errors over the frames where the node published a pose)."""
    def stat(a, unit):
        if not len(a):
            return "n/a"
        return f"{np.median(a):7.1f} {unit} median, {np.percentile(a, 90):7.1f} p90"

    lines = [
        f"frames {run.frames}, solved {run.processed}, poses published {run.published}, dropped {run.dropped}",
        f"{'':22s}{'position error':>32s}   {'rotation error':>30s}",
        f"{'kinematics alone':22s}{stat(run.kin_trans_mm, 'mm'):>32s}   {stat(run.kin_rot_deg, 'deg'):>30s}",
        f"{'node (camera)':22s}{stat(run.node_trans_mm, 'mm'):>32s}   {stat(run.node_rot_deg, 'deg'):>30s}",
        f"error inside the published 3-sigma: {run.within_3sigma:.0%}" if run.published else
        "no pose published",
        f"rate {run.rate_hz:.1f} frames/s, latency p50 {run.latency_ms_p50:.0f} ms, p95 {run.latency_ms_p95:.0f} ms",
    ]
    for reason, n in sorted(run.refusals.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  refused {n}x: {reason}")
    return "\n".join(lines)
