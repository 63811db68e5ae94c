"""Carry fiducial ground truth across the frames without it: a random-walk discrepancy, filtered and smoothed.

The model (FIG. 5; the README beside this file says why this one):

* ``S`` is a fixed camera-from-base transform fitted to the fiducial frames of
  the sequence (:func:`fit_camera_base`); the labeller is never told the true
  one. ``K_k = S . FK(q_k)`` is the kinematic end-effector pose in the camera
  frame from the *measured* joints of frame k; ``c_k`` its position.
* The state ``x_k = [dt, dw]`` (m, rad; camera axes) is the correction that
  takes ``K_k`` to the true pose: ``t = c_k + dt``, ``R = Exp(dw) R_K``. It is
  the discrepancy ``D_k = T_cam_ee . K_k^-1`` written in the tangent space at
  the hand (``D_k`` rotates about ``c_k``), so its covariance is directly the
  label's covariance in the ``PoseWithCovariance`` convention.
* Between frames ``D`` follows a random walk. With ``transport="spatial"``
  the nominal ``D`` is carried unchanged from frame to frame, and because the
  hand moves, the tangent-space coordinates are re-expressed at the new hand
  position: ``dt' = dt - (c_k - c_{k-1}) x dw`` (a rotation error of the
  camera-base discrepancy moves the hand in proportion to the lever arm).
  With ``transport="local"`` the correction itself is held (``F = I``).
  Process noise per step: ``Q = dt_s Q_time + |dq|_1 Q_motion`` (per second
  and per radian of joint travel; backlash and configuration-dependent joint
  errors change the discrepancy only when the arm moves).
* Fiducial frames measure ``z_k = x_k + w_k + v_k``: ``v`` the fiducial's
  error (its 6x6 covariance), ``w`` the white joint-encoder noise of that
  frame pushed through the arm's Jacobian (``W_k``), which no neighbour can
  predict.

:func:`kalman_filter` and :func:`rts_smoother` are the plain linear-Gaussian
forward filter and Rauch-Tung-Striebel smoother on arrays; the filter alone
is the one-sided estimate (past good frames only), the smoother the two-sided
one. With a diffuse initial state the smoother's estimate before the first
good frame is the one-sided estimate from the later ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["InterpolationConfig", "kalman_filter", "rts_smoother", "transport_matrix", "process_noise",
           "fit_camera_base", "motion_direction", "interpolate_sequence", "InterpolationResult"]


@dataclass
class InterpolationConfig:
    """Settings of the discrepancy model and of what gets a label."""

    #: "spatial" (the camera-from-base discrepancy is held, F carries the lever arm) or "local" (F = I)
    transport: str = "spatial"
    #: which joint-space terms join the SE(3) discrepancy in the state: "none" (the plain 6-D random walk),
    #: "offset" (+ a constant correction per joint), "backlash" (+ offset, half play width, initial play)
    joint_model: str = "backlash"
    #: random-walk standard deviation of the SE(3) discrepancy per sqrt(second): position (m), rotation (rad)
    process_pos_per_sqrt_s: float = 0.002
    process_rot_per_sqrt_s: float = 0.002
    #: random-walk standard deviation per sqrt(radian of joint travel, summed over joints)
    process_pos_per_sqrt_rad: float = 0.004
    process_rot_per_sqrt_rad: float = 0.004
    #: frames further than this (s) from every good fiducial frame are left unlabelled
    max_gap_s: float = 2.0
    #: a sequence with fewer good fiducial frames than this is left unlabelled (one detection cannot be
    #: checked against anything, and it alone would fix every label of the sequence)
    min_fiducial_frames: int = 3
    #: scale the sequence's label covariances by the a-posteriori variance factor of its fiducial frames
    #: (mean normalised leave-one-out residual), when that is above 1
    variance_factor: bool = True
    #: pseudo-frames of the factor's prior at 1 (shrinks the factor of sequences with few fiducial frames)
    variance_factor_prior_frames: float = 3.0
    #: white noise of the measured joints (rad; m for prismatic joints) when it is not estimated from the stream
    joint_noise_rad: float = 0.0012
    joint_noise_m: float = 0.0001
    #: the arm's joint error spec, used as priors: encoder offset std (rad, m) and backlash width range (rad)
    joint_offset_std_rad: float = 0.0175
    joint_offset_std_m: float = 0.0005
    backlash_rad: tuple[float, float] = (0.0087, 0.0175)
    #: a joint's motion direction (for backlash) flips when its measured value leaves a dead band of this many
    #: noise standard deviations
    direction_band_sigma: float = 8.0
    #: linearise the kinematics again around the estimated joint corrections this many times
    relinearize: int = 2
    #: diffuse prior of the SE(3) discrepancy (std): position (m), rotation (rad)
    prior_pos: float = 1.0
    prior_rot: float = 1.0


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]], dtype=np.float64)


def transport_matrix(c_prev: np.ndarray, c_next: np.ndarray, transport: str = "spatial") -> np.ndarray:
    """F carrying ``[dt, dw]`` from the tangent space at ``c_prev`` to that at ``c_next`` (6x6)."""
    F = np.eye(6)
    if transport == "spatial":
        F[:3, 3:] = -_skew(np.asarray(c_next, dtype=np.float64) - np.asarray(c_prev, dtype=np.float64))
    elif transport != "local":
        raise ValueError(f"transport must be 'spatial' or 'local', got {transport!r}")
    return F


def process_noise(dt_s: float, joint_travel: float, cfg: InterpolationConfig) -> np.ndarray:
    """Q of one step: ``dt_s`` seconds and ``joint_travel`` (sum of |dq|) of motion."""
    qp = cfg.process_pos_per_sqrt_s ** 2 * dt_s + cfg.process_pos_per_sqrt_rad ** 2 * joint_travel
    qr = cfg.process_rot_per_sqrt_s ** 2 * dt_s + cfg.process_rot_per_sqrt_rad ** 2 * joint_travel
    return np.diag([qp] * 3 + [qr] * 3)


def kalman_filter(F: np.ndarray, Q: np.ndarray, z: np.ndarray, R: np.ndarray, x0: np.ndarray, P0: np.ndarray,
                  H: np.ndarray | None = None):
    """Forward Kalman filter.

    Args:
        F, Q: (N, d, d) transition into step k and its process noise (entry 0 unused).
        z: (N, m) measurements, rows of NaN where there is none.
        R: (N, m, m) measurement noise.
        x0, P0: state before step 0 (d,), (d, d).
        H: (N, m, d) measurement matrices (default identity, m = d).

    Returns:
        ``(x_pred, P_pred, x_filt, P_filt)``, each (N, d) or (N, d, d).
    """
    N = z.shape[0]
    d = len(x0)
    xp, Pp = np.zeros((N, d)), np.zeros((N, d, d))
    xf, Pf = np.zeros((N, d)), np.zeros((N, d, d))
    x, P = np.asarray(x0, dtype=np.float64), np.asarray(P0, dtype=np.float64)
    eye = np.eye(d)
    for k in range(N):
        if k > 0:
            x = F[k] @ x
            P = F[k] @ P @ F[k].T + Q[k]
        xp[k], Pp[k] = x, P
        if np.all(np.isfinite(z[k])):
            Hk = eye if H is None else H[k]
            S = Hk @ P @ Hk.T + R[k]
            G = np.linalg.solve(S, Hk @ P).T  # P H^T S^-1
            x = x + G @ (z[k] - Hk @ x)
            A = eye - G @ Hk
            P = A @ P @ A.T + G @ R[k] @ G.T  # Joseph form
        P = 0.5 * (P + P.T)
        xf[k], Pf[k] = x, P
    return xp, Pp, xf, Pf


def rts_smoother(F: np.ndarray, x_pred: np.ndarray, P_pred: np.ndarray, x_filt: np.ndarray, P_filt: np.ndarray):
    """Rauch-Tung-Striebel backward pass over :func:`kalman_filter`'s output: ``(x_smooth, P_smooth)``."""
    N = len(x_filt)
    xs, Ps = x_filt.copy(), P_filt.copy()
    for k in range(N - 2, -1, -1):
        Pp = P_pred[k + 1]
        C = np.linalg.lstsq(Pp, F[k + 1] @ P_filt[k], rcond=None)[0].T  # P_f F^T P_p^-1
        xs[k] = x_filt[k] + C @ (xs[k + 1] - x_pred[k + 1])
        P = P_filt[k] + C @ (Ps[k + 1] - Pp) @ C.T
        Ps[k] = 0.5 * (P + P.T)
    return xs, Ps


def _pose_err(T_est: np.ndarray, T_ref: np.ndarray) -> np.ndarray:
    from .fiducial import pose_error

    return pose_error(T_est, T_ref)


def fit_camera_base(T_cam_ee: np.ndarray, T_base_ee: np.ndarray, cov: np.ndarray | None = None,
                    iterations: int = 5) -> np.ndarray:
    """The fixed ``S = T_camera_base`` that best maps the kinematic poses onto the fiducial ones.

    Weighted Gauss-Newton on the residuals ``pose_error(T_cam_ee_i, S . T_base_ee_i)`` (tangent space at
    the hand), started from the first pair; ``cov`` (M, 6, 6) weights them.
    """
    from .fiducial import pose_perturb

    M = len(T_cam_ee)
    if M == 0:
        raise ValueError("fit_camera_base needs at least one fiducial pose")
    S = T_cam_ee[0] @ np.linalg.inv(T_base_ee[0])
    Wt = [np.eye(6) if cov is None else np.linalg.inv(cov[i]) for i in range(M)]
    for _ in range(iterations):
        H = np.zeros((6, 6))
        g = np.zeros(6)
        for i in range(M):
            K = S @ T_base_ee[i]
            r = _pose_err(T_cam_ee[i], K)  # at c = K's position
            # S <- (t + a, Exp(b) R) moves the hand by a + b x (c - t_S) and rotates it by b
            J = np.eye(6)
            J[:3, 3:] = -_skew(K[:3, 3] - S[:3, 3])
            H += J.T @ Wt[i] @ J
            g += J.T @ Wt[i] @ r
        step = np.linalg.solve(H + 1e-12 * np.eye(6), g)
        S = pose_perturb(S, step)
        if np.linalg.norm(step) < 1e-10:
            break
    return S


def motion_direction(q: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Direction of each joint's latest motion along a sampled stream: (N, n) -> (N, n) in {-1, 0, +1}.

    A dead band of width ``band`` (n,) follows the measured value (a play operator on the measurement): the
    direction flips when the value leaves the band on the other side, so encoder noise inside the band never
    flips it. 0 until a joint has moved at all.
    """
    q = np.asarray(q, dtype=np.float64)
    half = np.asarray(band, dtype=np.float64) / 2
    out = np.zeros_like(q)
    y = q[0].copy()
    cur = np.zeros(q.shape[1])
    for i in range(len(q)):
        up = q[i] > y + half
        dn = q[i] < y - half
        y = np.where(up, q[i] - half, np.where(dn, q[i] + half, y))
        cur = np.where(up, 1.0, np.where(dn, -1.0, cur))
        out[i] = cur
    return out


@dataclass
class InterpolationResult:
    """Per-frame labels of one sequence (N frames)."""

    y: np.ndarray  # (N, 6) correction of the kinematic pose K_k (tangent space at the hand)
    label_cov: np.ndarray  # (N, 6, 6) covariance of the label
    T_label: np.ndarray  # (N, 4, 4) labelled end-effector pose in the camera frame (NaN: unlabelled)
    T_kin: np.ndarray  # (N, 4, 4) the kinematic pose K_k = S FK(q_k + joint corrections) it corrects
    mode: list  # per frame: "fiducial", "two_sided", "forward", "backward" or None (unlabelled)
    gap_s: np.ndarray  # (N,) time to the nearest good frame (inf when there is none)
    S: np.ndarray | None  # (4, 4) the fitted camera-from-base transform
    y_filter: np.ndarray  # (N, 6) the forward filter's (one-sided) estimate of the same correction
    cov_filter: np.ndarray  # (N, 6, 6)
    joint_correction: np.ndarray | None  # (N, n) estimated true - measured joints
    state: np.ndarray | None = None  # (N, d) smoothed state
    state_cov: np.ndarray | None = None
    variance_factor: float = 1.0  # the factor the label covariances were scaled by


def _empty_result(N: int) -> InterpolationResult:
    nan6, nan66, nan44 = np.full((N, 6), np.nan), np.full((N, 6, 6), np.nan), np.full((N, 4, 4), np.nan)
    return InterpolationResult(nan6, nan66, nan44, nan44.copy(), [None] * N, np.full(N, np.inf), None,
                               nan6.copy(), nan66.copy(), None)


def interpolate_sequence(stamps: np.ndarray, joints: np.ndarray, fk, good: np.ndarray, T_fid: np.ndarray,
                         cov_fid: np.ndarray, cfg: InterpolationConfig | None = None,
                         joint_noise: np.ndarray | None = None, direction: np.ndarray | None = None,
                         revolute: np.ndarray | None = None) -> InterpolationResult:
    """Label every frame of one sequence from its good fiducial frames and its measured kinematics.

    Args:
        stamps: (N,) seconds.
        joints: (N, n) measured joints at the frames.
        fk: ``fk(q (N, n)) -> (T_base_ee (N, 4, 4), J (N, 6, n))``, the geometric Jacobian in the base
            frame at the hand (rows: linear, angular), e.g. :meth:`RobotModel.ee_jacobian`.
        good: (N,) bool, frames whose fiducial passed the gate.
        T_fid: (N, 4, 4) fiducial end-effector poses (camera frame; rows of non-good frames ignored).
        cov_fid: (N, 6, 6) their covariances.
        joint_noise: (n,) white joint noise std (default from ``cfg``).
        direction: (N, n) each joint's latest motion direction (:func:`motion_direction`); needed by
            ``joint_model="backlash"`` (without it the model falls back to "offset").
        revolute: (n,) bool (default: all revolute).
    """
    cfg = cfg or InterpolationConfig()
    if cfg.joint_model not in ("none", "offset", "backlash"):
        raise ValueError(f"joint_model must be 'none', 'offset' or 'backlash', got {cfg.joint_model!r}")
    stamps = np.asarray(stamps, dtype=np.float64)
    q = np.asarray(joints, dtype=np.float64)
    N, n = q.shape
    good = np.asarray(good, dtype=bool)
    idx = np.flatnonzero(good)
    if len(idx) == 0 or len(idx) < cfg.min_fiducial_frames:
        res = _empty_result(N)
        res.gap_s = (np.min(np.abs(stamps[:, None] - stamps[idx][None, :]), axis=1) if len(idx)
                     else np.full(N, np.inf))
        return res
    revolute = np.ones(n, bool) if revolute is None else np.asarray(revolute, dtype=bool)
    sig = (np.where(revolute, cfg.joint_noise_rad, cfg.joint_noise_m) if joint_noise is None
           else np.asarray(joint_noise, dtype=np.float64))

    T_base_ee, J = fk(q)
    S = fit_camera_base(T_fid[idx], T_base_ee[idx], cov_fid[idx])
    active = np.linalg.norm(J, axis=(0, 1)) > 1e-9  # joints that move the hand
    model = cfg.joint_model if (cfg.joint_model != "backlash" or direction is not None) else "offset"
    cols_o = np.flatnonzero(active) if model in ("offset", "backlash") else np.zeros(0, int)
    cols_b = np.flatnonzero(active & revolute) if model == "backlash" else np.zeros(0, int)
    mo, mb = len(cols_o), len(cols_b)
    d = 6 + mo + 2 * mb
    if model == "backlash":
        sgn = np.asarray(direction, dtype=np.float64)[:, cols_b]  # (N, mb)
        moving = (sgn != 0).astype(np.float64)
    # priors
    x0 = np.zeros(d)
    P0 = np.zeros((d, d))
    P0[:6, :6] = np.diag([cfg.prior_pos ** 2] * 3 + [cfg.prior_rot ** 2] * 3)
    o_std = np.where(revolute, cfg.joint_offset_std_rad, cfg.joint_offset_std_m)
    P0[6:6 + mo, 6:6 + mo] = np.diag(o_std[cols_o] ** 2)
    if mb:
        b_lo, b_hi = cfg.backlash_rad
        h0, h_std = (b_lo + b_hi) / 4, max((b_hi - b_lo) / 4, 1e-6)  # half width: mean, ~uniform range / 2
        x0[6 + mo:6 + mo + mb] = h0
        P0[6 + mo:6 + mo + mb, 6 + mo:6 + mo + mb] = np.eye(mb) * h_std ** 2
        P0[6 + mo + mb:, 6 + mo + mb:] = np.eye(mb) * (b_hi / 2 / np.sqrt(3)) ** 2  # initial play ~ U(-b/2, b/2)
    Rs = np.zeros((6, 6))
    Rs[:3, :3] = Rs[3:, 3:] = S[:3, :3]

    def corrections(state: np.ndarray) -> np.ndarray:
        """Joint corrections (N, n) from smoothed states (N, d)."""
        dq = np.zeros((N, n))
        if mo:
            dq[:, cols_o] += state[:, 6:6 + mo]
        if mb:
            dq[:, cols_b] += sgn * state[:, 6 + mo:6 + mo + mb] + (1 - moving) * state[:, 6 + mo + mb:]
        return dq

    dq_hat = np.zeros((N, n))
    passes = 1 + (max(cfg.relinearize, 0) if d > 6 else 0)
    for _ in range(passes):
        T_base_ee, J = fk(q + dq_hat)
        Kc = S[None] @ T_base_ee  # kinematic poses in the camera frame
        c = Kc[:, :3, 3]
        Jc = Rs[None] @ J  # (N, 6, n): joint corrections -> hand correction, camera axes
        W = Jc @ np.diag(sig ** 2)[None] @ Jc.transpose(0, 2, 1)  # white joint noise of each frame
        H = np.zeros((N, 6, d))
        H[:, :, :6] = np.eye(6)
        if mo:
            H[:, :, 6:6 + mo] = Jc[:, :, cols_o]
        if mb:
            H[:, :, 6 + mo:6 + mo + mb] = Jc[:, :, cols_b] * sgn[:, None, :]
            H[:, :, 6 + mo + mb:] = Jc[:, :, cols_b] * (1 - moving)[:, None, :]
        lin = (Jc @ dq_hat[:, :, None])[:, :, 0]  # what the linearisation point already corrects
        F = np.repeat(np.eye(d)[None], N, 0)
        Q = np.zeros((N, d, d))
        for k in range(1, N):
            F[k, :6, :6] = transport_matrix(c[k - 1], c[k], cfg.transport)
            travel = float(np.abs(q[k] - q[k - 1]).sum())
            Q[k, :6, :6] = process_noise(max(stamps[k] - stamps[k - 1], 0.0), travel, cfg)
        z = np.full((N, 6), np.nan)
        R = np.repeat(np.eye(6)[None], N, 0)
        for k in idx:
            z[k] = _pose_err(T_fid[k], Kc[k]) + lin[k]
            R[k] = cov_fid[k] + W[k]
        xp, Pp, xf, Pf = kalman_filter(F, Q, z, R, x0, P0, H)
        xs, Ps = rts_smoother(F, xp, Pp, xf, Pf)
        dq_new = corrections(xs)
        if np.max(np.abs(dq_new - dq_hat)) < 1e-7:
            dq_hat = dq_new
            break
        dq_hat = dq_new
    # labels relative to the final linearisation point K_k
    y = np.einsum("kij,kj->ki", H, xs) - lin
    M = np.einsum("kij,kjl,kml->kim", H, Ps, H)
    y_f = np.einsum("kij,kj->ki", H, xf) - lin
    M_f = np.einsum("kij,kjl,kml->kim", H, Pf, H) + W
    label_cov = M + W

    gap = np.min(np.abs(stamps[:, None] - stamps[idx][None, :]), axis=1)
    t_good = stamps[idx]
    mode: list = []
    nis = []
    for k in range(N):
        if good[k]:
            mode.append("fiducial")
            # the fiducial measures the true pose: fuse it with what the other frames predict (leave-one-out)
            zk = z[k] - lin[k]
            Ri = np.linalg.inv(R[k])
            info_loo = np.linalg.inv(M[k]) - Ri
            info_loo = 0.5 * (info_loo + info_loo.T)
            ev = np.linalg.eigvalsh(info_loo)
            if ev.min() > 1e-6 * max(ev.max(), 1e-12):
                P_loo = np.linalg.inv(info_loo)
                y_loo = P_loo @ (np.linalg.solve(M[k], y[k]) - Ri @ zk)
                r = zk - y_loo
                nis.append(float(r @ np.linalg.solve(P_loo + R[k], r)))
                A = np.linalg.inv(P_loo + W[k])
                V = np.linalg.inv(cov_fid[k])
                Pl = np.linalg.inv(A + V)
                y[k] = Pl @ (A @ y_loo + V @ zk)
                label_cov[k] = 0.5 * (Pl + Pl.T)
            else:  # nothing else informs this frame: the fiducial alone
                y[k] = zk
                label_cov[k] = cov_fid[k]
        elif gap[k] > cfg.max_gap_s:
            mode.append(None)
        else:
            before, after = bool(np.any(t_good < stamps[k])), bool(np.any(t_good > stamps[k]))
            mode.append("two_sided" if before and after else "forward" if before else "backward")
    factor = 1.0
    if cfg.variance_factor and nis:
        nu = cfg.variance_factor_prior_frames
        factor = max(1.0, (float(np.sum(nis)) + 6.0 * nu) / (6.0 * (len(nis) + nu)))
        label_cov = label_cov * factor
        M_f = M_f * factor
    from .fiducial import pose_perturb

    T_label = np.full((N, 4, 4), np.nan)
    for k in range(N):
        if mode[k] is None:
            y[k] = np.nan
            label_cov[k] = np.nan
        else:
            T_label[k] = pose_perturb(Kc[k], y[k])
    return InterpolationResult(y, label_cov, T_label, Kc, mode, gap, S, y_f, M_f,
                               dq_hat if d > 6 else None, xs, Ps, factor)
