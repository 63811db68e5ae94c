"""Time per frame of the network stage on this CPU: preprocess + HeatmapNet + heat-map transformation.

Runs, side by side in one process on the same 640x480 frames:

* ours: what :class:`~pose_estimator.estimator.Estimator` does before the solver,
  with the shipped model when present (else the default architecture
  untrained): crop/resize around the arm (plus the kinematic-prior maps for a
  network that takes them) + HeatmapNet + soft-argmax with covariance +
  mapping back to image pixels; for a model trained for the end-effector
  refinement crop, all of it twice (the arm, and the hand), the second crop
  beside the first in a helper thread as the estimator runs them
  (``parallel_crops``); beside it the two one after the other
  (``parallel_crops_speedup``: that over ours) and one crop alone
  (``ms_per_frame_one_crop_median``);
* the network alone: as the estimator runs it (batch norm folded into the
  convolutions, weights and input channels-last on a CPU), folded in the default
  memory layout (``channels_last_speedup``: that over the first), and not folded,
  as trained (``fold_speedup``: that over the second); the soft-argmax and the
  Gaussian fit alone;
* a peer for scale: OpenCV's ArUco marker detector on the same frames (the
  classic fiducial approach to finding a hand in an image).

Prints a table; the last line is one JSON object with ``ms_per_frame_median``,
``input_size``, ``peak_rss_mb`` and the other figures.

    python benchmarks/inference.py [--frames 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from pose_estimator.config import EstimatorConfig
from pose_estimator.estimator import Estimator, refine_roi
from pose_estimator.keypoints import gaussian_fit2d, soft_argmax2d
from pose_estimator.model_io import load_model
from pose_estimator.network import HeatmapNet, HeatmapNetConfig
from pose_estimator.robot import RobotModel, resource_dir


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Textured 640x480 frames with an ArUco marker (so the peer has something to find)."""
    rng = np.random.default_rng(seed)
    d = cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50)
    marker = cv2.aruco.generateImageMarker(d, 7, 120)
    out = []
    for _ in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), (7, 7), 0)
        x, y = int(rng.integers(0, 500)), int(rng.integers(0, 340))
        img[y:y + 140, x:x + 140] = 255
        img[y + 10:y + 130, x + 10:x + 130] = marker[:, :, None]
        out.append(img)
    return out


def timed(fn, items, warmup: int = 5) -> list[float]:
    for it in items[:warmup]:
        fn(it)
    ts = []
    for it in items:
        t0 = time.perf_counter()
        fn(it)
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--model", default=str(resource_dir() / "models" / "panda.safetensors"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    info: dict = {}
    if Path(args.model).is_file():
        net, info = load_model(args.model)
        which = Path(args.model).name
    else:
        net = HeatmapNet(HeatmapNetConfig()).eval()
        which = "default architecture (untrained)"
    cfg = net.config
    robot = RobotModel.from_yaml(info.get("robot") or "panda")
    est = Estimator(robot, net, EstimatorConfig(), model_info=info)
    imgs = frames(args.frames)
    K = robot.num_keypoints
    # Where kinematics would put the keypoints: an arm about 280 px tall in the middle of the frame.
    uv_kin = np.column_stack([np.linspace(240, 400, K), np.linspace(380, 100, K)])
    roi = (180.0, 100.0, 460.0, 380.0)
    x0 = est.preprocess(imgs[0], roi)[0][None]
    if cfg.prior_channels:  # the kinematic prior maps go in beside the image
        x0 = torch.cat([x0, torch.zeros(1, cfg.prior_channels, *cfg.input_size)], 1)
    one_crop = lambda img: est.detect(img, roi, uv_kin)
    # A model trained for the end-effector refinement crop is run twice a frame, as the estimator runs it:
    # the whole arm, then a closer crop around the hand (here the top of the arm, about 120 px).
    roi2 = refine_roi(uv_kin, list(range(K - 3, K)), 640, 480, est.refine_margin or 0.0, 1.0)
    refine = est.refine_margin is not None and est.config.refine_end_effector
    # ... the second beside the first, in the estimator's helper thread (config.parallel_crops), as it runs
    # them; and one after the other (parallel_crops: false), as it ran them before
    ours = (lambda img: est.detect_crops(img, [roi, roi2], uv_kin)) if refine else one_crop
    est_serial = Estimator(robot, net, EstimatorConfig(parallel_crops=False), model_info=info)
    serial = (lambda img: est_serial.detect_crops(img, [roi, roi2], uv_kin)) if refine else one_crop

    fused = est.net  # what the estimator runs: batch norm folded into the convolutions, channels-last on a CPU
    x0_est = x0.contiguous(memory_format=est.memory_format)
    # the same folded network in the default (contiguous) memory layout, to tell the two speed-ups apart
    fused_contiguous = net.fused().eval() if isinstance(net, HeatmapNet) else net

    @torch.inference_mode()
    def net_only(_):
        return fused(x0_est)

    @torch.inference_mode()
    def net_contiguous(_):
        return fused_contiguous(x0)

    @torch.inference_mode()
    def net_unfused(_):
        return net(x0)

    with torch.inference_mode():
        logits0 = net(x0).double()
    sa = lambda _: soft_argmax2d(logits0)
    gf = lambda _: gaussian_fit2d(logits0)
    detector = cv2.aruco.ArucoDetector(cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50),
                                       cv2.aruco.DetectorParameters())
    grey = [cv2.cvtColor(i, cv2.COLOR_RGB2GRAY) for i in imgs]
    aruco = lambda g: detector.detectMarkers(g)

    rows = {
        "ours (preprocess + network + soft-argmax)": timed(ours, imgs),
        "ours, one crop (no refinement crop)": timed(one_crop, imgs),
        "ours, the two crops one after the other": timed(serial, imgs),
        "network alone": timed(net_only, imgs),
        "network alone, contiguous memory layout": timed(net_contiguous, imgs),
        "network alone, batch norm not folded (as trained)": timed(net_unfused, imgs),
        "soft-argmax alone": timed(sa, imgs),
        "Gaussian fit alone": timed(gf, imgs),
        "OpenCV ArUco detectMarkers (peer)": timed(aruco, grey),
    }
    med = {k: statistics.median(v) for k, v in rows.items()}
    p95 = {k: float(np.percentile(v, 95)) for k, v in rows.items()}
    print(f"model: {which}; input {cfg.input_size[1]}x{cfg.input_size[0]}, heat maps at stride {cfg.stride}, "
          f"{cfg.num_keypoints} keypoints; {args.threads} torch thread(s); {len(imgs)} frames 640x480")
    print(f"{'stage':<45} {'median ms':>10} {'p95 ms':>8}")
    for k in rows:
        print(f"{k:<45} {med[k]:>10.2f} {p95[k]:>8.2f}")
    ours_ms = med["ours (preprocess + network + soft-argmax)"]
    peer = med["OpenCV ArUco detectMarkers (peer)"]
    print(f"ours / ArUco detection: {ours_ms / peer:.2f}x   target: <= 25 ms per frame")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "ms_per_frame_median": round(ours_ms, 3),
        "ms_per_frame_p95": round(p95["ours (preprocess + network + soft-argmax)"], 3),
        "fps": round(1000 / ours_ms, 1),
        "refine_crop": refine,
        "ms_per_frame_one_crop_median": round(med["ours, one crop (no refinement crop)"], 3),
        "ms_per_frame_crops_serial_median": round(med["ours, the two crops one after the other"], 3),
        "parallel_crops_speedup": round(med["ours, the two crops one after the other"] / ours_ms, 3),
        "input_size": list(cfg.input_size),
        "prior_channels": cfg.prior_channels,
        "network_ms_median": round(med["network alone"], 3),
        "network_unfused_ms_median": round(med["network alone, batch norm not folded (as trained)"], 3),
        "network_contiguous_ms_median": round(med["network alone, contiguous memory layout"], 3),
        "fold_speedup": round(med["network alone, batch norm not folded (as trained)"]
                              / med["network alone, contiguous memory layout"], 3),
        "channels_last_speedup": round(med["network alone, contiguous memory layout"] / med["network alone"], 3),
        "softargmax_ms_median": round(med["soft-argmax alone"], 3),
        "gaussian_fit_ms_median": round(med["Gaussian fit alone"], 3),
        "aruco_ms_median": round(peer, 3),
        "ratio_vs_aruco": round(ours_ms / peer, 3),
        "threads": args.threads,
        "parameters": sum(p.numel() for p in net.parameters()),
        "model": which,
        "peak_rss_mb": round(rss, 1),
    }))


if __name__ == "__main__":
    main()
