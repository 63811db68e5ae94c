"""The debug image: keypoints, their covariance ellipses, the network's crops and the hand axes on the frame.

Pure numpy/OpenCV (no ROS): the node calls :func:`draw_debug` only when
someone subscribes to ``~/debug_image``; the demo writes the same pictures
as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..geometry import CameraModel

__all__ = ["draw_debug"]

# Inlier keypoints green, outliers orange, low-confidence grey (RGB).
_INLIER, _OUTLIER, _WEAK = (40, 220, 60), (255, 140, 0), (150, 150, 150)
# The crops the network looked at: the whole arm's light blue, the end effector's close look yellow.
_ROI_COLORS = ((90, 170, 255), (255, 220, 0))


def draw_debug(rgb: np.ndarray, keypoints: np.ndarray, keypoint_covariance: np.ndarray,
               confidence: np.ndarray | None = None, inliers: np.ndarray | None = None,
               camera: CameraModel | None = None, pose: np.ndarray | None = None, text: str = "",
               sigma: float = 2.0, axis_length: float = 0.1, min_confidence: float = 0.0,
               rois: Sequence[tuple[float, float, float, float] | None] = ()) -> np.ndarray:
    """A copy of ``rgb`` (H, W, 3 uint8) with the estimate drawn on it.

    Args:
        keypoints: (K, 2) px; keypoint_covariance: (K, 2, 2) px²; ellipses are ``sigma``-sigma.
        pose: T_camera_ee (4x4); its x/y/z axes (red/green/blue, ``axis_length`` m) are
            projected with ``camera`` (distortion included) when both are given and finite.
        text: status line written at the top left.
        rois: the crops the network looked at, (x0, y0, x1, y1) px each (None: none), drawn as
            boxes under the keypoints: the first (the whole arm) light blue, the second (the end
            effector's refinement crop) yellow.
    """
    out = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    h, w = out.shape[:2]
    K = len(keypoints)
    conf = np.ones(K) if confidence is None else np.asarray(confidence)
    inl = np.ones(K, bool) if inliers is None else np.asarray(inliers, bool)
    lw = max(1, round(min(h, w) / 320))
    for roi, color in zip(rois, _ROI_COLORS):
        if roi is not None and np.all(np.isfinite(roi)) and np.all(np.abs(roi) < 1e5):
            x0, y0, x1, y1 = (int(round(c)) for c in roi)
            cv2.rectangle(out, (x0, y0), (x1, y1), color, lw)
    for k in range(K):
        u, v = keypoints[k]
        if not (np.isfinite(u) and np.isfinite(v)):
            continue
        color = _WEAK if conf[k] < min_confidence else (_INLIER if inl[k] else _OUTLIER)
        C = np.asarray(keypoint_covariance[k], dtype=np.float64)
        if np.all(np.isfinite(C)):
            evals, evecs = np.linalg.eigh(0.5 * (C + C.T))
            evals = np.clip(evals, 0.0, None)
            axes = sigma * np.sqrt(evals)
            if np.all(axes < 4 * max(h, w)):
                angle = float(np.degrees(np.arctan2(evecs[1, 1], evecs[0, 1])))
                cv2.ellipse(out, (int(round(u * 16)), int(round(v * 16))),
                            (int(round(axes[1] * 16)), int(round(axes[0] * 16))), angle, 0, 360, color, lw,
                            cv2.LINE_AA, shift=4)
        if -w <= u < 2 * w and -h <= v < 2 * h:
            cv2.circle(out, (int(round(u)), int(round(v))), 2 * lw, color, -1, cv2.LINE_AA)
    if camera is not None and pose is not None and np.all(np.isfinite(pose)) and pose[2, 3] > 0:
        P = np.vstack([np.zeros(3), np.eye(3) * axis_length])  # origin, x, y, z tips in the ee frame
        Pc = P @ pose[:3, :3].T + pose[:3, 3]
        if np.all(Pc[:, 2] > 1e-3):
            uv = cv2.projectPoints(Pc, np.zeros(3), np.zeros(3), camera.K, camera.dist)[0][:, 0]
            if np.all(np.isfinite(uv)) and np.all(np.abs(uv) < 1e5):
                o = tuple(int(round(c)) for c in uv[0])
                for tip, color in zip(uv[1:], [(255, 0, 0), (0, 255, 0), (0, 90, 255)]):
                    cv2.line(out, o, tuple(int(round(c)) for c in tip), color, 2 * lw, cv2.LINE_AA)
    if text:
        scale = 0.4 * lw
        cv2.putText(out, text, (6, int(16 * lw)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3 * lw, cv2.LINE_AA)
        cv2.putText(out, text, (6, int(16 * lw)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), lw, cv2.LINE_AA)
    return out
