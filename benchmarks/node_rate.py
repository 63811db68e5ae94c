#!/usr/bin/env python3
"""The node at camera rate: throughput, latency, dropped frames and memory, against the bare Estimator.

Plays a 30 Hz recording (default 640x480, generated once and cached) in a
loop into the node, which runs as its own process exactly as `ros2 run`
would start it (default parameters from config/pose_estimator.yaml), over
loopback DDS. Side by side, on the same frames and with the same settings, it
times the bare :class:`pose_estimator.estimator.Estimator` in this process.

Measured:
* throughput_hz  -- frames the node finished per second (``~/status``, one per solved frame);
                    pose_hz counts published poses only
* latency_ms_p50/p95 -- from the player publishing an image to its ``~/status`` arriving here
                    (what a consumer sees for a live camera whose stamps are "now")
* dropped_frames -- frames the node skipped because a newer one arrived first (its diagnostics)
* overhead_ratio -- node time per frame (worker: took the frame -> published, median) over the
                    bare Estimator.estimate time per frame (median)
* rss_mb_start / rss_mb_end / rss_mb_peak -- the node process's resident memory after warm-up,
                    at the end, and its peak (VmHWM)

Prints a table, then one JSON object on the last line.

Usage: python benchmarks/node_rate.py [--duration 30] [--model PATH] [--width 640 --height 480]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
if "POSE_ESTIMATOR_BENCH_DOMAIN_ID" in os.environ:
    os.environ["ROS_DOMAIN_ID"] = os.environ["POSE_ESTIMATOR_BENCH_DOMAIN_ID"]
else:
    os.environ["ROS_DOMAIN_ID"] = str(100 + os.getpid() % 100)

import numpy as np  # noqa: E402


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def resolve_model(arg: str | None, cache: Path) -> tuple[Path, str]:
    from pose_estimator.ros.node import default_model_path
    from pose_estimator.ros.testing import make_model

    if arg:
        return Path(arg), "given"
    for p in default_model_path("panda"):
        if p.is_file():
            return p, "default"
    return make_model(cache / "untrained.safetensors"), "untrained (no default model found)"


def bare_estimator(model: Path, seq: Path, threads: int, extrinsic: bool, passes: int = 2) -> dict:
    """Estimator.estimate alone on the recording's frames, with the node's settings (median ms)."""
    import cv2
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from pose_estimator.config import load_config
    from pose_estimator.estimator import Estimator
    from pose_estimator.geometry import CameraModel

    cfg = load_config(ROOT / "config" / "pose_estimator.yaml")
    est = Estimator.from_files(model, cfg)
    meta = json.loads((seq / "sequence.json").read_text())
    cam = meta["camera"]
    camera = CameraModel(np.array(cam["K"]), cam["width"], cam["height"], np.array(cam["dist"]))
    T_cb = np.linalg.inv(np.array(cam["T_base_camera"])) if extrinsic else None
    frames = [json.loads(line) for line in (seq / "frames.jsonl").read_text().splitlines()]
    images = [np.ascontiguousarray(cv2.imread(str(seq / f["image"]))[..., ::-1]) for f in frames]
    est.warm_up()
    times = []
    converged = 0
    for p in range(passes):
        est.reset()
        for img, f in zip(images, frames):
            t0 = time.perf_counter()
            e = est.estimate(img, camera, np.array(f["joints_measured"]), camera_from_base=T_cb)
            dt = (time.perf_counter() - t0) * 1e3
            if p > 0:  # the first pass warms up caches and the tracker
                times.append(dt)
                converged += int(e.converged)
    return {"ms_median": float(np.median(times)), "ms_p95": float(np.percentile(times, 95)), "frames": len(times),
            "converged": converged, "threads": torch.get_num_threads(), "times": times}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of playback into the node")
    ap.add_argument("--model", default=None, help="model file (default: the packaged model, else untrained)")
    ap.add_argument("--recording", default=None, help="sequence folder with bag/ (default: generate one)")
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--frames", type=int, default=90, help="frames in the generated recording (played in a loop)")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--cache", default=str(ROOT / "build" / "bench_node_rate"), help="where generated data goes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, the same for the node (torch_threads) and the bare Estimator; 0 = torch's "
                         "default. 1 by default: on a busy 2-core machine more threads oversubscribe the CPU")
    ap.add_argument("--extrinsic", action="store_true",
                    help="seed with the recorded camera extrinsic: node camera_extrinsic_from_tf:=true (from the "
                         "recording's /tf_static), bare Estimator camera_from_base=the same transform")
    ap.add_argument("--image-qos", default="sensor_data", choices=["sensor_data", "reliable"],
                    help="the node's image_qos parameter (best-effort 640x480 frames can be lost in DDS transport "
                         "on a loaded machine before the node sees them; see transport_lost)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME:=VALUE",
                    help="extra node parameter (repeatable), e.g. camera_extrinsic_from_tf:=true")
    args = ap.parse_args(argv)

    from pose_estimator.ros.testing import make_recording

    cache = Path(args.cache)
    seq = Path(args.recording) if args.recording else make_recording(cache, frames=args.frames, width=args.width,
                                                                     height=args.height, fps=args.fps)
    model, model_kind = resolve_model(args.model, cache)
    print(f"recording {seq} ({args.width}x{args.height} @ {args.fps:g} Hz), model {model} [{model_kind}]",
          file=sys.stderr)

    # ---------------------------------------------------------------- the bare Estimator
    bare = bare_estimator(model, seq, args.threads, args.extrinsic)
    print(f"bare Estimator: {bare['ms_median']:.1f} ms/frame median over {bare['frames']} frames", file=sys.stderr)

    # ---------------------------------------------------------------- the node, as its own process
    cmd = [sys.executable, "-m", "pose_estimator.ros.node", "--ros-args",
           "--params-file", str(ROOT / "config" / "pose_estimator.yaml"),
           "-p", f"model_path:={model}", "-p", f"stats_window_s:={min(600.0, args.duration + 30):.1f}",
           "-p", f"torch_threads:={args.threads}",
           "-r", "image:=/camera/image_raw", "-r", "camera_info:=/camera/camera_info"]
    if args.extrinsic:
        cmd += ["-p", "camera_extrinsic_from_tf:=true"]
    cmd += ["-p", f"image_qos:={args.image_qos}"]
    for prm in args.param:
        cmd += ["-p", prm]
    node_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    node_log: list[str] = []
    threading.Thread(target=lambda: node_log.extend(node_proc.stderr), daemon=True).start()

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor

    from pose_estimator.msg import EstimateStatus
    from pose_estimator.ros.player import BagPlayer
    from pose_estimator.ros.testing import wait_for

    rclpy.init()
    node = rclpy.create_node("node_rate_bench")
    published: dict[int, float] = {}  # image stamp -> wall time of publishing
    lock = threading.Lock()
    lat: list[float] = []
    done: list[float] = []
    poses: list[float] = []
    diag: dict[str, str] = {}

    def on_publish(topic, stamp_ns, wall):
        if topic == "/camera/image_raw":
            with lock:
                published[stamp_ns] = wall

    def on_status(msg):
        now = time.monotonic()
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        with lock:
            t = published.get(stamp)
        if t is not None:
            lat.append((now - t) * 1e3)
        done.append(now)
        if not msg.message:
            poses.append(now)

    def on_diag(msg):
        for st in msg.status:
            if st.hardware_id == "/pose_estimator":
                diag.clear()
                diag.update({kv.key: kv.value for kv in st.values})

    node.create_subscription(EstimateStatus, "/pose_estimator/status", on_status, 100)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    threading.Thread(target=ex.spin, daemon=True).start()
    code = 0
    try:
        latched = BagPlayer(node, seq, topics=["/robot_description", "/tf_static"])
        player = BagPlayer(node, seq, rate=1.0, loop=True, on_publish=on_publish,
                           exclude=["/robot_description", "/tf_static"])
        if not wait_for(lambda: node_proc.poll() is not None or
                        node.count_subscribers("/camera/image_raw") > 0, 60):
            raise RuntimeError("the node did not subscribe to /camera/image_raw within 60 s")
        if node_proc.poll() is not None:
            raise RuntimeError(f"the node exited with {node_proc.returncode}: {''.join(node_log)[-2000:]}")
        latched.play()
        if not wait_for(lambda: diag.get("robot_model", "waiting").split(" ")[0] in ("topic", "robot", "file"), 60):
            raise RuntimeError("the node did not build its robot model")
        # Warm-up: a couple of seconds of stream, then measure from a clean slate.
        warm = threading.Thread(target=player.play, kwargs={"duration_s": 2.0})
        warm.start()
        warm.join()
        player = BagPlayer(node, seq, rate=1.0, loop=True, on_publish=on_publish,
                           exclude=["/robot_description", "/tf_static"])
        time.sleep(0.5)  # let the last warm-up frame finish (not a synchronisation: it only trims the tail)
        lat.clear()
        done.clear()
        poses.clear()
        rss_start = rss_mb(node_proc.pid)
        diag_start = dict(diag)
        t0 = time.monotonic()
        stats = player.play(duration_s=args.duration)
        t1 = time.monotonic()
        wait_for(lambda: len(done) > 0 and time.monotonic() - done[-1] > 0.5, 5)
        wait_for(lambda: float(diag.get("frames_received", 0)) >= float(diag_start.get("frames_received", 0))
                 + stats.per_topic.get("/camera/image_raw", 0) * 0.95, 5)
        time.sleep(1.2)  # one more diagnostics period so its counters include the last frames
        rss_end = rss_mb(node_proc.pid)
        rss_peak = rss_mb(node_proc.pid, "VmHWM")
        images = stats.per_topic.get("/camera/image_raw", 0)
        finished = [t for t in done if t0 <= t <= t1 + 1.0]
        dropped = int(diag.get("frames_dropped", 0)) - int(diag_start.get("frames_dropped", 0))
        node_ms = float(diag.get("processing_ms_p50", "nan"))
        result = {
            "throughput_hz": len(finished) / (t1 - t0),
            "pose_hz": len([t for t in poses if t0 <= t <= t1 + 1.0]) / (t1 - t0),
            "input_hz": images / (t1 - t0),
            "latency_ms_p50": float(np.percentile(lat, 50)) if lat else float("nan"),
            "latency_ms_p95": float(np.percentile(lat, 95)) if lat else float("nan"),
            "dropped_frames": dropped,
            # (>= 0: a warm-up frame still in flight can land in the measured window)
            "transport_lost": max(0, images - (int(diag.get("frames_received", 0))
                                               - int(diag_start.get("frames_received", 0)))),
            "images_published": images,
            "node_ms_per_frame": node_ms,
            "node_estimator_ms": float(diag.get("estimator_ms_p50", "nan")),
            "bare_ms_per_frame": bare["ms_median"],
            "overhead_ratio": node_ms / bare["ms_median"] if bare["ms_median"] > 0 else float("nan"),
            "rss_mb_start": rss_start,
            "rss_mb_end": rss_end,
            "rss_mb_peak": rss_peak,
            "duration_s": t1 - t0,
            "torch_threads": args.threads,
            "extrinsic": args.extrinsic,
            "cpu_count": os.cpu_count(),
            "width": args.width,
            "height": args.height,
            "model": model_kind,
            "bare_converged_fraction": bare["converged"] / max(bare["frames"], 1),
            "node_frames_received": int(diag.get("frames_received", 0)) - int(diag_start.get("frames_received", 0)),
            "image_qos": args.image_qos,
            "node_frames_processed": int(diag.get("frames_processed", 0)) - int(diag_start.get("frames_processed", 0)),
            "node_last_problem": diag.get("last_problem", ""),
            "pipeline": diag.get("pipeline", ""),  # as the node chose it (its default depends on the cores)
        }
    except Exception as e:  # noqa: BLE001 - report and clean up
        print(f"node_rate: {e}", file=sys.stderr)
        result, code = None, 1
    finally:
        if node_proc.poll() is None:
            node_proc.send_signal(signal.SIGINT)
            try:
                node_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node_proc.kill()
        ex.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    if result is None:
        return code
    # The bare Estimator again, now that the node is gone: the CPU may be shared with other work, so the
    # reference is the median over both runs (before and after), not one moment.
    after = bare_estimator(model, seq, args.threads, args.extrinsic)
    pooled = float(np.median(bare["times"] + after["times"]))
    result["bare_ms_per_frame"] = pooled
    result["bare_ms_before_after"] = [bare["ms_median"], after["ms_median"]]
    result["overhead_ratio"] = node_ms / pooled if pooled > 0 else float("nan")
    bare["ms_median"] = pooled
    rows = [("throughput (Hz)", f"{result['throughput_hz']:.1f}", f"input {result['input_hz']:.1f} Hz"),
            ("poses published (Hz)", f"{result['pose_hz']:.1f}", ""),
            ("latency p50 / p95 (ms)", f"{result['latency_ms_p50']:.1f} / {result['latency_ms_p95']:.1f}",
             "image published -> ~/status received"),
            ("dropped frames", f"{dropped}",
             f"of {images}; {result['transport_lost']} lost in DDS before the node (image_qos {args.image_qos})"),
            ("node / bare ms per frame", f"{node_ms:.1f} / {bare['ms_median']:.1f}",
             f"overhead ratio {result['overhead_ratio']:.2f}"),
            ("node RSS start / end / peak (MB)", f"{rss_start:.0f} / {rss_end:.0f} / {rss_peak:.0f}", "")]
    print(f"\nnode_rate: {args.width}x{args.height} @ {args.fps:g} Hz for {result['duration_s']:.0f} s, "
          f"model {model_kind}")
    for name, val, note in rows:
        print(f"  {name:34s} {val:>16s}   {note}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
