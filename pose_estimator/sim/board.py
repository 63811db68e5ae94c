"""The ChArUco board on the hand: its OpenCV description, texture and detection.

The board is the fiducial that gives the hand's pose "when enough of it is
seen" (FIG. 5, high-quality pose information). This module keeps the board's
geometry in OpenCV's conventions so that what the renderer draws and what
``cv2.aruco.CharucoDetector`` measures are the same object: board frame origin
at the top-left outer corner, x along columns, y along rows, z into the board.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from .config import BoardSpec

__all__ = ["make_board", "board_texture", "board_corners_3d", "charuco_corner_bias", "BoardDetection", "detect_board"]


def make_board(spec: BoardSpec) -> "cv2.aruco.CharucoBoard":
    """The ``cv2.aruco.CharucoBoard`` that ``spec`` describes."""
    name = spec.dictionary
    if not hasattr(cv2.aruco, name):
        raise ValueError(f"unknown ArUco dictionary '{name}' (e.g. DICT_4X4_50, DICT_5X5_100)")
    if spec.marker_length >= spec.square_length:
        raise ValueError(f"marker_length ({spec.marker_length}) must be < square_length ({spec.square_length})")
    dictionary = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, name))
    return cv2.aruco.CharucoBoard((spec.squares_x, spec.squares_y), spec.square_length,
                                  spec.marker_length, dictionary)


def board_texture(spec: BoardSpec) -> np.ndarray:
    """The printed face as a grey image (rows = board y, columns = board x), no margin."""
    px = spec.texture_px_per_square
    return make_board(spec).generateImage((spec.squares_x * px, spec.squares_y * px), marginSize=0, borderBits=1)


def board_corners_3d(spec: BoardSpec) -> np.ndarray:
    """The inner chessboard corners in the board frame, (N, 3) metres, in ChArUco id order."""
    return np.asarray(make_board(spec).getChessboardCorners(), dtype=np.float64).reshape(-1, 3)


@lru_cache(maxsize=8)
def _bias(dictionary: str, sx: int, sy: int, square: float, marker: float) -> tuple[float, float]:
    spec = BoardSpec(dictionary=dictionary, squares_x=sx, squares_y=sy, square_length=square, marker_length=marker)
    board = make_board(spec)
    px, ss, scale = 100, 8, 24.0  # texture px per square, supersampling, output px per square
    tex = board.generateImage((sx * px, sy * px), marginSize=0, borderBits=1)
    offset = np.array([20.3, 17.6])  # board origin in the output image, off the pixel grid
    # texel centre (i + 0.5) -> output pixel scale * (i + 0.5) / px + offset -> supersampled ss * u + (ss - 1) / 2
    a = scale / px * ss
    M = np.array([[a, 0, ss * offset[0] + (ss - 1) / 2 + a / 2],
                  [0, a, ss * offset[1] + (ss - 1) / 2 + a / 2],
                  [0, 0, 1]])
    w, h = int(sx * scale + 2 * offset[0]), int(sy * scale + 2 * offset[1])
    hi = cv2.warpPerspective(tex, M, (w * ss, h * ss), flags=cv2.INTER_NEAREST, borderValue=255)
    img = cv2.resize(hi, (w, h), interpolation=cv2.INTER_AREA)  # box filter: exact pixel coverage
    cc, ci, _, _ = cv2.aruco.CharucoDetector(board).detectBoard(img)
    if ci is None or len(ci) < 1:
        return (0.0, 0.0)
    true = board_corners_3d(spec)[ci.reshape(-1), :2] / square * scale + offset
    bias = (cc.reshape(-1, 2) - true).mean(0)
    return float(bias[0]), float(bias[1])


def charuco_corner_bias(spec: BoardSpec) -> np.ndarray:
    """Mean offset (px) of ``CharucoDetector``'s corners from the true ones, measured once per board on an
    antialiased synthetic image (so it follows whatever the installed OpenCV does)."""
    return np.array(_bias(spec.dictionary, spec.squares_x, spec.squares_y, spec.square_length, spec.marker_length))


@dataclass
class BoardDetection:
    """What ``detect_board`` found: the board pose in the camera frame when enough corners were seen."""

    T_camera_board: np.ndarray | None  # (4, 4) or None
    corner_ids: np.ndarray  # (M,)
    corners: np.ndarray  # (M, 2) px
    reprojection_rms: float


def detect_board(image: np.ndarray, K: np.ndarray, dist: np.ndarray | None, spec: BoardSpec,
                 min_corners: int = 4) -> BoardDetection:
    """Detect the board in an RGB or grey image and estimate its pose (solvePnP on the ChArUco corners)."""
    board = make_board(spec)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    detector = cv2.aruco.CharucoDetector(board)
    cc, ci, _, _ = detector.detectBoard(grey)
    if cc is None or ci is None or len(ci) < min_corners:
        return BoardDetection(None, np.zeros(0, int), np.zeros((0, 2)), float("nan"))
    ids = ci.reshape(-1).astype(int)
    # OpenCV's ChArUco corners can be offset from the true saddle points (4.12: +0.5 px in x and y,
    # several mm of depth at a metre); subtract the offset measured on a synthetic image.
    pts = cc.reshape(-1, 2) - charuco_corner_bias(spec)
    img = pts.reshape(-1, 2).astype(np.float64)
    obj = board_corners_3d(spec)[ids]
    dist = np.zeros(5) if dist is None else np.asarray(dist, dtype=np.float64)
    if board.checkCharucoCornersCollinear(ci):
        return BoardDetection(None, ids, img, float("nan"))
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, dist, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return BoardDetection(None, ids, img, float("nan"))
    rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, dist, rvec, tvec)
    proj, _ = cv2.projectPoints(obj, rvec, tvec, K, dist)
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - img) ** 2, -1))))
    T = np.eye(4)
    T[:3, :3] = cv2.Rodrigues(rvec)[0]
    T[:3, 3] = tvec.reshape(3)
    return BoardDetection(T, ids, img, rms)
