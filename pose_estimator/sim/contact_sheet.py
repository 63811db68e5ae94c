"""A contact sheet: a grid of generated frames with their ground truth drawn, for a person to look at.

Keypoints are filled green when visible, hollow orange when in the image but
hidden; a thin line joins consecutive keypoints of the same chain. The board
outline is drawn (cyan when the board counts as visible, grey otherwise) with
its ChArUco corners, and the end-effector axes (x red, y green, z blue).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .camera import SimCamera, project_points
from .dataset import SyntheticDataset, SyntheticFrame

__all__ = ["draw_frame", "make_contact_sheet"]


def _pt(uv) -> tuple[int, int]:
    return int(round(uv[0] * 4)), int(round(uv[1] * 4))  # 2 bits of sub-pixel precision (shift=2)


def draw_frame(frame: SyntheticFrame, board_size: tuple[float, float] | None = None, scale: int = 2) -> np.ndarray:
    """The frame's image (RGB) upscaled by ``scale`` with keypoints, board and end-effector axes drawn."""
    img = cv2.resize(frame.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cam = SimCamera(frame.K, frame.dist, frame.width, frame.height)

    def px(uv):
        return _pt((np.asarray(uv) + 0.5) * scale - 0.5)  # pixel centres stay pixel centres when upscaled

    if board_size is not None:
        w, h = board_size
        t = np.linspace(0, 1, 9)[:-1]
        edge = np.concatenate([np.c_[t * w, 0 * t], np.c_[w + 0 * t, t * h], np.c_[w - t * w, h + 0 * t],
                               np.c_[0 * t, h - t * h]])
        T = frame.board_pose_camera
        pts = (T[:3, :3] @ np.c_[edge, np.zeros(len(edge))].T).T + T[:3, 3]
        if np.all(pts[:, 2] > 0.01):
            uv = project_points(pts, cam)
            color = (0, 220, 255) if frame.board_visible else (150, 150, 150)
            cv2.polylines(img, [np.array([px(p) for p in uv], np.int32)], True, color, 1, cv2.LINE_AA, shift=2)
        for uv, vis in zip(frame.board_corners_2d, frame.board_corners_visible):
            if vis:
                cv2.drawMarker(img, tuple(int(v) for v in (np.asarray(uv) + 0.5) * scale - 0.5), (0, 220, 255),
                               cv2.MARKER_CROSS, 5, 1)
    # End-effector axes, 5 cm.
    T = frame.ee_pose_camera
    axes = np.r_[[T[:3, 3]], (T[:3, :3] * 0.05).T + T[:3, 3]]
    if np.all(axes[:, 2] > 0.01):
        uv = project_points(axes, cam)
        for j, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            cv2.line(img, px(uv[0]), px(uv[j + 1]), c, 1, cv2.LINE_AA, shift=2)
    for uv, inside, vis in zip(frame.keypoints_2d, frame.keypoints_in_image, frame.keypoints_visible):
        if not inside:
            continue
        if vis:
            cv2.circle(img, px(uv), 3 * 4, (0, 255, 0), -1, cv2.LINE_AA, shift=2)
        else:
            cv2.circle(img, px(uv), 3 * 4, (255, 140, 0), 1, cv2.LINE_AA, shift=2)
    label = f"{frame.sequence}/{frame.index}" + (" board" if frame.board_visible else "") + \
        (f" blur {frame.blur_px:.0f}px" if frame.blur_px else "")
    cv2.putText(img, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def make_contact_sheet(dataset: str | os.PathLike | SyntheticDataset, out: str | os.PathLike, frames: int = 12,
                       columns: int = 4, seed: int = 0, scale: int = 2) -> Path:
    """Write a PNG grid of ``frames`` frames spread over the dataset; returns its path."""
    ds = dataset if isinstance(dataset, SyntheticDataset) else SyntheticDataset(dataset, require_complete=False)
    if len(ds) == 0:
        raise ValueError(f"{ds.root} has no frames")
    rng = np.random.default_rng(seed)
    n = min(frames, len(ds))
    # Evenly spread, jittered, so every sequence shows up in a small sheet.
    idx = sorted({int(min(len(ds) - 1, (i + rng.random()) * len(ds) / n)) for i in range(n)})
    board = ds.meta.get("board")
    size = None
    if board:
        spec = board["spec"]
        size = (spec["squares_x"] * spec["square_length"], spec["squares_y"] * spec["square_length"])
    tiles = [draw_frame(ds[i], size, scale) for i in idx]
    th = max(t.shape[0] for t in tiles)
    tw = max(t.shape[1] for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    sheet = np.full((rows * th + (rows + 1) * 4, columns * tw + (columns + 1) * 4, 3), 40, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = 4 + r * (th + 4), 4 + c * (tw + 4)
        sheet[y:y + t.shape[0], x:x + t.shape[1]] = t
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {out}")
    return out
