"""Fiducial ground truth: the ChArUco board on the hand, gated to "high-quality pose information".

One frame in, one :class:`FiducialMeasurement` out: the board is detected and
its pose estimated (:func:`pose_estimator.sim.board.detect_board`), measurable
quality criteria decide whether the frame may serve as ground truth, and the
board pose is composed with the fixed board-to-hand transform to give the
end-effector pose in the camera frame with a 6x6 covariance.

Covariance convention (as ``geometry.py`` and ``PoseWithCovariance``): a pose
``(R, t)`` is perturbed as ``t <- t + dt``, ``R <- Exp(dw) R``, with ``dt``
(m) and ``dw`` (rad) both in the camera frame's axes; the 6-vector is
``[dt, dw]``. The covariance is the Gauss-Newton one of the PnP problem,
``s^2 (J^T J)^-1``, where ``J`` is the Jacobian of the projected board corners
with respect to the *end-effector* pose (so the lever arm from board to hand
is inside ``J``), ``s`` the corner noise (the fit's residual standard
deviation, never below ``pixel_sigma_floor``), then inflated and floored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

__all__ = ["FiducialGate", "FiducialMeasurement", "measure_fiducial", "board_region_mask", "sharpness",
           "pose_perturb", "pose_error", "planar_pose_solutions"]


@dataclass
class FiducialGate:
    """What makes a board detection "high-quality pose information"; every criterion is measurable.

    Defaults suit the 16 cm 4x4 ChArUco board at 640x480 and 0.8-2.5 m (the
    synthetic world); the README lists the numbers behind them.
    """

    #: ChArUco corners found (the 4x4 board has 9) - few-corner detections flip
    min_corners: int = 7
    #: RMS reprojection error of the PnP fit (px)
    max_reprojection_rms: float = 0.5
    #: apparent size: square root of the board's projected area (px)
    min_size_px: float = 70.0
    #: sharpness (dimensionless): variance of the Laplacian inside the board's image region over the grey-level
    #: variance there (contrast-free), times the apparent square size in px (edge density-free). Measured on
    #: antialiased and on rendered boards alike: ~25-85 sharp, ~10 after a Gaussian blur of 0.75 px, ~5.5 at
    #: 1 px, ~3.8 at 1.25 px, ~2.8 at 1.5 px
    min_sharpness: float = 5.0
    #: angle between the board's normal and the line of sight (deg)
    max_view_angle_deg: float = 60.0
    #: planar pose ambiguity: RMS reprojection error of the other (mirror) IPPE solution over the chosen one's.
    #: A small board seen nearly face-on fits two poses tilted ~10-40 deg apart almost equally well; the
    #: covariance (a local figure) cannot see that, this ratio does
    min_ambiguity_ratio: float = 3.0
    #: predicted 1-sigma end-effector position uncertainty, largest axis (mm): the gate that ties the other
    #: criteria to the accuracy a label needs
    max_position_sigma_mm: float = 8.0
    #: corner noise floor (px) for the covariance, and the factor it is inflated by (model errors)
    pixel_sigma_floor: float = 0.12
    covariance_inflation: float = 1.5
    #: floors added to the covariance: position (m) and rotation (rad) standard deviations
    position_sigma_floor: float = 0.0003
    rotation_sigma_floor: float = 0.0005


@dataclass
class FiducialMeasurement:
    """The board in one frame, the quality figures and the gate's verdict."""

    detected: bool
    accepted: bool
    reasons: list[str] = field(default_factory=list)  # why it was rejected (empty when accepted)
    corners: int = 0
    reprojection_rms: float = float("nan")
    size_px: float = float("nan")
    sharpness: float = float("nan")
    view_angle_deg: float = float("nan")
    ambiguity_ratio: float = float("nan")
    position_sigma_mm: float = float("nan")
    T_camera_board: np.ndarray | None = None
    T_camera_ee: np.ndarray | None = None  # (4, 4)
    covariance: np.ndarray | None = None  # (6, 6) [dt (m), dw (rad)], camera axes

    def summary(self) -> dict:
        def f(x, nd=4):
            return None if x is None or not np.isfinite(x) else round(float(x), nd)

        return {"detected": self.detected, "accepted": self.accepted, "reasons": list(self.reasons),
                "corners": self.corners, "reprojection_rms": f(self.reprojection_rms),
                "size_px": f(self.size_px, 1), "sharpness": f(self.sharpness, 2), "view_angle_deg": f(self.view_angle_deg, 2),
                "ambiguity_ratio": f(self.ambiguity_ratio, 2),
                "position_sigma_mm": f(self.position_sigma_mm, 3)}


def pose_perturb(T: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Apply ``d = [dt, dw]`` to pose ``T``: ``t + dt``, ``Exp(dw) R`` (camera-axes convention)."""
    out = np.array(T, dtype=np.float64, copy=True)
    out[:3, :3] = cv2.Rodrigues(np.asarray(d[3:6], dtype=np.float64).reshape(3, 1))[0] @ T[:3, :3]
    out[:3, 3] = T[:3, 3] + d[:3]
    return out


def pose_error(T_est: np.ndarray, T_ref: np.ndarray) -> np.ndarray:
    """The 6-vector ``d`` with ``pose_perturb(T_ref, d) == T_est`` (position difference, rotation vector)."""
    R = T_est[:3, :3] @ T_ref[:3, :3].T
    w = cv2.Rodrigues(np.ascontiguousarray(R))[0].reshape(3)
    return np.r_[T_est[:3, 3] - T_ref[:3, 3], w]


def board_region_mask(shape: tuple[int, int], T_camera_board: np.ndarray, K: np.ndarray, dist: np.ndarray,
                      width_m: float, height_m: float, shrink: float = 0.0) -> np.ndarray:
    """uint8 mask (255 inside) of the board face's projection; ``shrink`` (m) pulls the outline inwards."""
    s = shrink
    outline = np.array([[s, s, 0], [width_m - s, s, 0], [width_m - s, height_m - s, 0], [s, height_m - s, 0]],
                       dtype=np.float64)
    rvec = cv2.Rodrigues(np.ascontiguousarray(T_camera_board[:3, :3]))[0]
    uv, _ = cv2.projectPoints(outline, rvec, T_camera_board[:3, 3].reshape(3, 1), K, dist)
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, np.round(uv.reshape(-1, 2) * 16).astype(np.int32), 255, cv2.LINE_8, shift=4)
    return mask


def sharpness(grey: np.ndarray, mask: np.ndarray) -> float:
    """Variance of the Laplacian inside ``mask`` over the grey-level variance there (1/px^2).

    Dividing by the grey-level variance makes the figure independent of the
    board's contrast (lighting, exposure); a Gaussian blur of sigma px scales
    it down by roughly ``1 / (1 + c sigma^2)``.
    """
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8))  # the Laplacian's 3x3 support stays inside
    sel = inner > 0
    if sel.sum() < 16:
        return 0.0
    g = grey.astype(np.float64)
    lap = cv2.Laplacian(g, cv2.CV_64F, ksize=1)
    var_g = float(g[sel].var())
    if var_g < 1e-6:
        return 0.0
    return float(lap[sel].var() / var_g)


def _project(obj: np.ndarray, T: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    rvec = cv2.Rodrigues(np.ascontiguousarray(T[:3, :3]))[0]
    uv, _ = cv2.projectPoints(obj, rvec, T[:3, 3].reshape(3, 1), K, dist)
    return uv.reshape(-1, 2)


def _pnp_jacobian(obj_ee: np.ndarray, T_camera_ee: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """d(projected corners)/d[dt, dw] of the end-effector pose, (2M, 6), by central differences."""
    J = np.zeros((2 * len(obj_ee), 6))
    h = 1e-6  # m and rad
    for i in range(6):
        d = np.zeros(6)
        d[i] = h
        J[:, i] = (_project(obj_ee, pose_perturb(T_camera_ee, d), K, dist)
                   - _project(obj_ee, pose_perturb(T_camera_ee, -d), K, dist)).reshape(-1) / (2 * h)
    return J


def planar_pose_solutions(obj: np.ndarray, img: np.ndarray, K: np.ndarray, dist: np.ndarray):
    """Both IPPE solutions of a planar PnP problem, each refined by LM: [(rms px, T (4, 4)), ...] best first."""
    out = []
    try:
        n, rvecs, tvecs, _ = cv2.solvePnPGeneric(obj, img, K, dist, flags=cv2.SOLVEPNP_IPPE)
    except cv2.error:
        return out
    for rvec, tvec in zip(rvecs[:n], tvecs[:n]):
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, dist, rvec.copy(), tvec.copy())
        proj, _ = cv2.projectPoints(obj, rvec, tvec, K, dist)
        rms = float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - img) ** 2, -1))))
        T = np.eye(4)
        T[:3, :3] = cv2.Rodrigues(rvec)[0]
        T[:3, 3] = tvec.reshape(3)
        if T[2, 3] > 0:
            out.append((rms, T))
    out.sort(key=lambda x: x[0])
    return out


def measure_fiducial(image: np.ndarray, K: np.ndarray, dist: np.ndarray | None, spec, T_ee_board: np.ndarray,
                     gate: FiducialGate | None = None) -> FiducialMeasurement:
    """Detect the board in ``image`` (RGB or grey), estimate the end-effector pose, apply the gate.

    ``spec`` is the :class:`~pose_estimator.sim.config.BoardSpec`, ``T_ee_board`` the board's pose in
    the end-effector frame. A detection that fails any criterion comes back with ``accepted=False`` and
    the failed criteria in ``reasons`` (its pose and covariance are still filled in when a pose exists).
    """
    from ..sim.board import board_corners_3d, detect_board

    gate = gate or FiducialGate()
    K = np.asarray(K, dtype=np.float64)
    dist = np.zeros(5) if dist is None else np.asarray(dist, dtype=np.float64)
    det = detect_board(image, K, dist, spec, min_corners=4)
    if det.T_camera_board is None:
        return FiducialMeasurement(detected=False, accepted=False, reasons=["not detected"],
                                   corners=int(len(det.corner_ids)))
    # both planar solutions: keep the better one, measure how much better it is than its mirror
    obj_board = board_corners_3d(spec)[det.corner_ids]
    sols = planar_pose_solutions(obj_board, det.corners.astype(np.float64), K, dist)
    T_cb, rms = det.T_camera_board, float(det.reprojection_rms)
    ambiguity = float("inf")
    if sols:
        if sols[0][0] < rms:
            rms, T_cb = sols[0]
        # the mirror: the solution whose rotation differs from the chosen one by more than a few degrees
        others = [r for r, T in sols if np.linalg.norm(pose_error(T, T_cb)[3:]) > np.radians(2.0)]
        if others:
            ambiguity = others[0] / max(rms, 1e-3)
    T_ee_board = np.asarray(T_ee_board, dtype=np.float64)
    T_ce = T_cb @ np.linalg.inv(T_ee_board)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    n = int(len(det.corner_ids))

    # apparent size and viewing angle from the estimated pose
    mask = board_region_mask(grey.shape, T_cb, K, dist, spec.width, spec.height)
    size_px = float(np.sqrt(max(int((mask > 0).sum()), 0)))
    centre = T_cb[:3, :3] @ np.array([spec.width / 2, spec.height / 2, 0.0]) + T_cb[:3, 3]
    normal = -T_cb[:3, 2]  # the printed face looks along -z_board
    cosang = float(np.dot(normal, -centre) / max(np.linalg.norm(centre), 1e-12))
    angle = float(np.degrees(np.arccos(np.clip(cosang, -1.0, 1.0))))
    # sharpness inside the printed squares (shrunk by a quarter square: off the board's rim)
    inner = board_region_mask(grey.shape, T_cb, K, dist, spec.width, spec.height, shrink=spec.square_length / 4)
    square_px = size_px / math.sqrt(spec.squares_x * spec.squares_y)
    sharp = sharpness(grey, inner) * square_px

    # covariance of the end-effector pose from the PnP Jacobian
    obj_ee = obj_board @ T_ee_board[:3, :3].T + T_ee_board[:3, 3]
    J = _pnp_jacobian(obj_ee, T_ce, K, dist)
    dof = max(2 * n - 6, 1)
    resid_var = rms ** 2 * 2 * n / dof
    s2 = max(resid_var, gate.pixel_sigma_floor ** 2) * gate.covariance_inflation ** 2
    try:
        cov = s2 * np.linalg.inv(J.T @ J)
    except np.linalg.LinAlgError:
        cov = np.diag([1.0] * 3 + [1.0] * 3)
    cov = 0.5 * (cov + cov.T)
    cov[:3, :3] += np.eye(3) * gate.position_sigma_floor ** 2
    cov[3:, 3:] += np.eye(3) * gate.rotation_sigma_floor ** 2
    pos_sigma_mm = float(np.sqrt(max(np.linalg.eigvalsh(cov[:3, :3]).max(), 0.0)) * 1000)

    reasons = []
    if n < gate.min_corners:
        reasons.append(f"corners {n} < {gate.min_corners}")
    if not rms <= gate.max_reprojection_rms:
        reasons.append(f"reprojection rms {rms:.2f} px > {gate.max_reprojection_rms}")
    if not size_px >= gate.min_size_px:
        reasons.append(f"size {size_px:.0f} px < {gate.min_size_px:.0f}")
    if not sharp >= gate.min_sharpness:
        reasons.append(f"sharpness {sharp:.3f} < {gate.min_sharpness}")
    if not angle <= gate.max_view_angle_deg:
        reasons.append(f"view angle {angle:.0f} deg > {gate.max_view_angle_deg:.0f}")
    if not ambiguity >= gate.min_ambiguity_ratio:
        reasons.append(f"ambiguous pose: mirror solution rms ratio {ambiguity:.2f} < {gate.min_ambiguity_ratio}")
    if not pos_sigma_mm <= gate.max_position_sigma_mm:
        reasons.append(f"position sigma {pos_sigma_mm:.1f} mm > {gate.max_position_sigma_mm}")
    return FiducialMeasurement(detected=True, accepted=not reasons, reasons=reasons, corners=n,
                               reprojection_rms=rms, size_px=size_px, sharpness=sharp,
                               view_angle_deg=angle, ambiguity_ratio=ambiguity, position_sigma_mm=pos_sigma_mm, T_camera_board=T_cb,
                               T_camera_ee=T_ce, covariance=cov)
