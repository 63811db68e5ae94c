"""The FIG. 3 process as one call: image (+ intrinsics, + joints) -> pose with covariance.

    image ─► crop around where kinematics puts the arm (affine remembered)
          ─► HeatmapNet ─► soft-argmax / Gaussian fit ─► keypoints + 2x2 covariances (image px)
    joints ─► forward kinematics ─► seed (camera-from-base from the last frame,
              a caller-supplied extrinsic, or PnP on the kinematic keypoints)
          ─► variance-weighted robust solver ─► end-effector pose + 6x6 covariance

:class:`Estimator` is plain numpy/torch; the ROS node only converts messages.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from .config import EstimatorConfig
from .geometry import CameraModel
from .keypoints import gaussian_fit2d, heatmap_to_input_affine, keypoints_to_image, prior_maps, soft_argmax2d
from .network import HeatmapNet
from .preprocess import Preprocessor, compose_affine, full_frame_roi
from .robot import RobotModel
from .solver import PoseSolution
from .solver import solve as solve_pose

__all__ = ["Estimate", "Estimator", "Observation", "kinematic_roi", "refine_roi"]


@dataclass
class Estimate:
    """One frame's result (numpy, float64). ``pose`` is T_camera_ee."""

    pose: np.ndarray  # (4, 4)
    covariance: np.ndarray  # (6, 6) x y z rx ry rz, ROS order
    converged: bool
    message: str
    keypoints: np.ndarray  # (K, 2) image px
    keypoint_covariance: np.ndarray  # (K, 2, 2) px^2
    confidence: np.ndarray  # (K,)
    inliers: np.ndarray  # (K,) bool
    residual: float
    residual_px: float
    iterations: int
    mode: str
    camera_from_base: np.ndarray | None = None
    joints: np.ndarray | None = None
    joint_covariance: np.ndarray | None = None
    kinematic_pose: np.ndarray | None = None  # T_camera_ee from the measured joints and the seed
    roi: tuple[float, float, float, float] | None = None
    seed_source: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: the end-effector refinement crop (x0, y0, x1, y1) when the network took a second look
    refine_roi: tuple[float, float, float, float] | None = None


@dataclass
class Observation:
    """What the network saw in one frame, before the solver (:meth:`Estimator.observe`).

    ``keypoint_covariance`` is the network's own, before the variance factors
    (the model's calibration and ``config.keypoint_variance_scale``), which
    :meth:`Estimator.solve` applies: so one observation can be solved again under
    other factors without running the network again (``pose-estimator calibrate``).
    """

    keypoints: np.ndarray  # (K, 2) image px
    keypoint_covariance: np.ndarray  # (K, 2, 2) px^2, unscaled
    confidence: np.ndarray  # (K,)
    roi: tuple[float, float, float, float]
    joints: np.ndarray  # (n,) measured
    camera: CameraModel
    camera_from_base: np.ndarray | None  # the seed, None: PnP on the keypoints decides
    seed_source: str  # "extrinsic", "tracked" or "" (none yet)
    keypoints_base: np.ndarray  # (K, 3) the keypoints where the measured joints put them, base frame
    ee_in_base: np.ndarray  # (4, 4) T_base_ee from the measured joints
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: the estimator's :meth:`Estimator.reset` count when it was made: a frame observed before a
    #: reset and solved after it (the node's pipeline) must not set the tracked camera pose again
    generation: int = 0
    #: the end-effector refinement crop, when there was one, and which keypoints combine its look with the first (K,)
    refine_roi: tuple[float, float, float, float] | None = None
    refined: np.ndarray | None = None


def kinematic_roi(uv: np.ndarray, width: int, height: int, margin: float, aspect: float,
                  min_size: float = 32.0) -> tuple[float, float, float, float] | None:
    """Box (x0, y0, x1, y1) around projected points with a margin, of the network's aspect (w/h).

    Returns None when nothing useful is in view (no finite points in the image).
    """
    ok = np.isfinite(uv).all(1)
    if not ok.any():
        return None
    p = uv[ok]
    x0, y0 = p.min(0)
    x1, y1 = p.max(0)
    w, h = max(x1 - x0, min_size), max(y1 - y0, min_size)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = w * (1 + 2 * margin), h * (1 + 2 * margin)
    if w / h > aspect:
        h = w / aspect
    else:
        w = h * aspect
    # A box entirely outside the image cannot hold the arm.
    if cx + w / 2 < 0 or cy + h / 2 < 0 or cx - w / 2 > width or cy - h / 2 > height:
        return None
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def refine_roi(uv: np.ndarray, rigid: list[int], width: int, height: int, margin: float, aspect: float,
               ) -> tuple[float, float, float, float] | None:
    """The end-effector refinement crop: :func:`kinematic_roi` around the rigid (end-effector) keypoints only.

    None without rigid keypoints or with none of them in view.
    """
    if not rigid:
        return None
    return kinematic_roi(np.asarray(uv)[list(rigid)], width, height, margin, aspect)


def _inside(uv: np.ndarray, roi, border: float) -> np.ndarray:
    """(K,) whether each point lies in ``roi`` shrunk by ``border`` (a fraction of its size) on every side."""
    x0, y0, x1, y1 = roi
    bx, by = border * (x1 - x0), border * (y1 - y0)
    with np.errstate(invalid="ignore"):
        return ((uv[:, 0] > x0 + bx) & (uv[:, 0] < x1 - bx) & (uv[:, 1] > y0 + by) & (uv[:, 1] < y1 - by))


class Estimator:
    """Image to end-effector pose with covariance, for one robot and one trained network."""

    def __init__(self, robot: RobotModel, net: torch.nn.Module, config: EstimatorConfig | None = None,
                 device: str | torch.device = "cpu", model_info: dict | None = None):
        """``model_info`` is the metadata :func:`~pose_estimator.model_io.load_model` returns with ``net``:
        its calibration and, for a network with kinematic-prior inputs, their width."""
        self.config = config or EstimatorConfig()
        self.robot = robot
        self.device = torch.device(device)
        # batch norm folded into the convolutions for speed (a copy: ``net`` itself is left as it is); on a
        # CPU, weights and input channels-last, which oneDNN's convolutions run faster (~20 % for the
        # shipped network at 2 threads)
        self.net = (net.fused() if isinstance(net, HeatmapNet) else net).to(self.device).eval()
        #: the network's weights' and input's memory layout (channels-last on a CPU)
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        if isinstance(net, HeatmapNet):
            self.net = self.net.to(memory_format=self.memory_format)
        info = model_info or {}
        extra = info.get("extra") or {}
        #: width (input px) of the kinematic-prior maps a network with prior channels is given
        self.prior_sigma = float(extra.get("prior_sigma", 2.0))
        ncfg = net.config
        if ncfg.num_keypoints != robot.num_keypoints:
            raise ValueError(f"network predicts {ncfg.num_keypoints} keypoints but robot "
                             f"'{robot.definition.name}' defines {robot.num_keypoints}")
        self.input_size = tuple(ncfg.input_size)  # (h, w)
        self.preprocess = Preprocessor(input_size=self.input_size)
        self.hm_affine = heatmap_to_input_affine(ncfg.stride)
        #: the model's own calibration of its heat-map variance (``pose-estimator calibrate``);
        #: ``config.keypoint_variance_scale`` multiplies on top of it
        self.model_variance_scale = float(extra.get("keypoint_variance_scale", 1.0))
        #: the model's calibration of the published pose covariance (``pose-estimator calibrate``): what
        #: makes 95 % of held-out end-effector positions fall inside the published 95 % ellipsoid
        self.pose_covariance_scale = float(extra.get("pose_covariance_scale", 1.0))
        #: the same for frames not seeded by an extrinsic (PnP, then the tracked camera pose); a model
        #: calibrated before this factor existed uses ``pose_covariance_scale``
        self.pose_covariance_scale_no_extrinsic = float(extra.get("pose_covariance_scale_no_extrinsic",
                                                                  self.pose_covariance_scale))
        #: the model's calibration of the joint prior against its keypoints (``pose-estimator calibrate``):
        #: a factor on ``config.joint_sigma``, below 1 where the network's errors are correlated across
        #: keypoints (the solver takes them as independent)
        self.joint_prior_scale = float(extra.get("joint_prior_scale", 1.0))
        #: margin of the end-effector refinement crop the model was trained with; None: not trained for one
        rm = extra.get("refine_margin")
        self.refine_margin = float(rm) if rm is not None else None
        #: the refinement crop's keypoints, as in training: the rigid ones only (a robot without any has no crop)
        self._refine_idx = robot.definition.rigid_indices()
        self._rigid_idx = self._refine_idx or list(range(robot.num_keypoints))
        self._camera_from_base: np.ndarray | None = None
        self._helper: ThreadPoolExecutor | None = None  # the second crop's thread, made at its first use
        self._helper_lock = threading.Lock()
        #: position uncertainty (largest 1-sigma, m) of the frame the tracked camera-from-base came from
        self._tracked_sigma: float | None = None
        self._generation = 0

    @classmethod
    def from_files(cls, model: str | Path, config: EstimatorConfig | None = None,
                   robot_description: str | None = None, device: str = "cpu") -> "Estimator":
        """Load a model file (safetensors) and the robot it names (or ``config.robot``)."""
        from .model_io import load_model

        net, info = load_model(model, device=device)
        cfg = config or EstimatorConfig(robot=info["robot"] or "panda")
        robot = RobotModel.from_yaml(cfg.robot, robot_description=robot_description)
        if info["keypoint_names"] and info["keypoint_names"] != robot.keypoint_names:
            raise ValueError(f"model {model} was trained for keypoints {info['keypoint_names']}, "
                             f"robot definition has {robot.keypoint_names}")
        return cls(robot, net, cfg, device=device, model_info=info)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One call of the network on a blank input: the first call allocates and is several times slower."""
        c = self.net.config
        self.net(torch.zeros(1, 3 + c.prior_channels, *c.input_size, device=self.device).contiguous(
            memory_format=self.memory_format))

    def reset(self) -> None:
        """Forget the tracked camera-from-base (e.g. when a recording loops).

        Observations made before the reset and solved after it leave the tracking alone.
        """
        self._camera_from_base = None
        self._tracked_sigma = None
        self._generation += 1

    def close(self) -> None:
        """Let the second crop's helper thread go (it is made again if the estimator is used again)."""
        with self._helper_lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.shutdown(wait=True)

    def _second_look(self, image: np.ndarray, roi, uv_kin: np.ndarray | None):
        """Start :meth:`_detect_raw` on ``roi`` in the helper thread, with the calling thread's torch threads."""
        with self._helper_lock:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="pose_estimator_crop")
            helper = self._helper
        n_threads = torch.get_num_threads()

        def look():
            if torch.get_num_threads() != n_threads:  # intra-op threads are per calling thread (OpenMP)
                torch.set_num_threads(n_threads)
            return self._detect_raw(image, roi, uv_kin)

        return helper.submit(look)

    # ------------------------------------------------------------------ pieces
    @property
    def variance_factor(self) -> float:
        """What the network's keypoint covariances are multiplied by before the solver."""
        return self.config.keypoint_variance_scale * self.model_variance_scale

    def joint_sigma(self) -> np.ndarray:
        """The joint prior's standard deviation per joint (rad, or m for a prismatic joint), (n,):
        ``config.joint_sigma`` / ``config.joint_sigma_m`` times the model's ``joint_prior_scale``."""
        cfg = self.config
        return np.where(self.robot.joint_is_revolute, cfg.joint_sigma, cfg.joint_sigma_m) * self.joint_prior_scale

    def detect(self, image: np.ndarray, roi=None, uv_kin: np.ndarray | None = None):
        """Keypoints in one crop: -> (uv (K,2), cov (K,2,2) image px, confidence (K,), timings ms).

        A network with prior channels is also given where ``uv_kin`` (image px, from the
        measured joints; None: unknown) puts each keypoint. ``cov`` has the variance
        factors applied (:attr:`variance_factor`).
        """
        uv, cov, conf, ms = self._detect_raw(image, roi, uv_kin)
        return uv, cov * self.variance_factor, conf, ms

    def detect_crops(self, image: np.ndarray, rois, uv_kin: np.ndarray | None = None) -> list[tuple]:
        """:meth:`detect` for several crops of one image, as :meth:`observe` runs its two: with
        ``config.parallel_crops`` the crops after the first in the helper thread, beside the first.
        -> one ``(uv, cov, confidence, timings ms)`` per crop."""
        return [(uv, cov * self.variance_factor, conf, ms)
                for uv, cov, conf, ms in self._detect_crops_raw(image, rois, uv_kin)]

    def _detect_crops_raw(self, image: np.ndarray, rois, uv_kin: np.ndarray | None = None) -> list[tuple]:
        rois = list(rois)
        if not rois:
            return []
        others = []
        if self.config.parallel_crops and len(rois) > 1:
            others = [self._second_look(image, r, uv_kin) for r in rois[1:]]  # beside this thread's first crop
        try:
            first = self._detect_raw(image, rois[0], uv_kin)
        finally:
            for f in others:
                f.exception()  # never left running into the next frame, even when the first crop failed
        rest = [f.result() for f in others] if others else [self._detect_raw(image, r, uv_kin) for r in rois[1:]]
        return [first, *rest]

    @torch.inference_mode()
    def _detect_raw(self, image: np.ndarray, roi=None, uv_kin: np.ndarray | None = None):
        net = self.net
        t0 = time.perf_counter()
        x, affine = self.preprocess(image, roi)
        if net.config.prior_channels:
            uv_in = np.full((net.config.num_keypoints, 2), np.nan)
            if uv_kin is not None:
                uv_in = (np.asarray(uv_kin, dtype=np.float64) - affine[:, 2]) @ np.linalg.inv(affine[:, :2]).T
            x = torch.cat([x, prior_maps(uv_in, self.input_size, self.prior_sigma)])
        t1 = time.perf_counter()
        logits = net(x[None].to(self.device).contiguous(memory_format=self.memory_format))
        t2 = time.perf_counter()
        logits = logits.contiguous().double()  # channels-last out of the network on a CPU
        if self.config.keypoint_method == "gaussian_fit":
            mean, cov, _ = gaussian_fit2d(logits / self.config.temperature)
            prob_max = torch.softmax(logits.flatten(2) / self.config.temperature, -1).max(-1).values
        else:
            mean, cov, prob_max = soft_argmax2d(logits, temperature=self.config.temperature, return_peak=True)
        A = compose_affine(np.asarray(affine, dtype=np.float64), self.hm_affine)
        uv, cov_img = keypoints_to_image(mean, cov, torch.as_tensor(A, dtype=torch.float64))
        # Confidence: the spatial-softmax peak relative to the peak of the
        # sharpest distribution the network is trained towards (sigma = 1 heat-map px).
        conf = (prob_max * 2 * np.pi).clamp(max=1.0)
        t3 = time.perf_counter()
        ms = {"preprocess": (t1 - t0) * 1e3, "network": (t2 - t1) * 1e3, "keypoints": (t3 - t2) * 1e3}
        return uv[0].cpu().numpy(), cov_img[0].cpu().numpy(), conf[0].cpu().numpy(), ms

    def _pnp_seed(self, P: np.ndarray, uv: np.ndarray, cam: CameraModel) -> np.ndarray | None:
        ok = np.isfinite(uv).all(1)
        if ok.sum() < 6:
            return None
        try:
            found, rvec, tvec, inl = cv2.solvePnPRansac(
                P[ok].astype(np.float64), uv[ok].astype(np.float64), cam.K, cam.dist,
                iterationsCount=100, reprojectionError=max(8.0, 0.02 * cam.width), flags=cv2.SOLVEPNP_SQPNP)
        except cv2.error:
            return None
        if not found or inl is None or len(inl) < 4:
            return None
        T = np.eye(4)
        T[:3, :3] = cv2.Rodrigues(rvec)[0]
        T[:3, 3] = tvec.ravel()
        return T

    # ------------------------------------------------------------------ the call
    def estimate(self, image: np.ndarray, camera: CameraModel, joints: np.ndarray | None = None,
                 camera_from_base: np.ndarray | None = None, joint_sigma_scale: float = 1.0) -> Estimate:
        """Estimate the end-effector pose in the camera frame for one frame.

        Args:
            image: (H, W, 3) uint8 RGB or (H, W) mono.
            camera: intrinsics of ``image`` (same size).
            joints: (n,) measured joint positions in :attr:`RobotModel.joint_names` order.
            camera_from_base: (4, 4) T_camera_base seed (e.g. a calibrated extrinsic);
                otherwise the last frame's estimate, otherwise PnP on the kinematic keypoints.
            joint_sigma_scale: widen the joint prior (stale joint states).

        The same as :meth:`solve` of :meth:`observe`.
        """
        return self.solve(self.observe(image, camera, joints, camera_from_base), joint_sigma_scale)

    def observe(self, image: np.ndarray, camera: CameraModel, joints: np.ndarray | None = None,
                camera_from_base: np.ndarray | None = None) -> Observation:
        """The network's half of :meth:`estimate`: crop where the measured joints put the arm, find the keypoints.

        With ``camera_from_base`` given, the result depends on nothing the estimator
        tracks or is calibrated with, so it can be solved again under other factors.
        Raises ``ValueError`` for input that cannot be a frame of this robot.
        """
        cfg = self.config
        if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(f"image must be a non-empty (H, W[, C]) array, got "
                             f"{getattr(image, 'shape', type(image))}")
        H, W = image.shape[:2]
        if (W, H) != (camera.width, camera.height):
            raise ValueError(f"image is {W}x{H} but camera info says {camera.width}x{camera.height}")
        if joints is None:
            raise ValueError("joint positions are required (the kinematic seed and prior)")
        q = np.asarray(joints, dtype=np.float64).reshape(-1)
        if q.shape[0] != self.robot.n_joints:
            raise ValueError(f"expected {self.robot.n_joints} joints {self.robot.joint_names}, got {q.shape[0]}")
        if not np.isfinite(q).all():
            raise ValueError("joint positions contain NaN or inf")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        q_t = torch.as_tensor(q)[None]
        P_base = self.robot.keypoints_3d(q_t)[0].numpy()  # (K, 3)
        T_be = self.robot.ee_pose(q_t)[0].numpy()
        seed_source = ""
        T_cb = None
        if camera_from_base is not None:
            T_cb, seed_source = np.asarray(camera_from_base, dtype=np.float64), "extrinsic"
        elif self._camera_from_base is not None:
            T_cb, seed_source = self._camera_from_base, "tracked"

        uv_kin = None
        if cfg.roi == "kinematic" and T_cb is not None:
            uv_kin = cv2.projectPoints(P_base, cv2.Rodrigues(T_cb[:3, :3])[0], T_cb[:3, 3], camera.K,
                                       camera.dist)[0][:, 0]
            in_front = (P_base @ T_cb[:3, :3].T + T_cb[:3, 3])[:, 2] > 0.05
            uv_kin[~in_front] = np.nan
        timings["kinematics"] = (time.perf_counter() - t0) * 1e3

        aspect = self.input_size[1] / self.input_size[0]
        roi = kinematic_roi(uv_kin, W, H, cfg.roi_margin, aspect) if uv_kin is not None else None
        if roi is None:
            roi = full_frame_roi(W, H, aspect)
        roi2 = refined = None
        if uv_kin is not None and cfg.refine_end_effector and self.refine_margin is not None:
            roi2 = refine_roi(uv_kin, self._refine_idx, W, H, self.refine_margin, aspect)
        # the whole arm and, where there is one, a second, closer look at the end effector, side by side
        # (two calls of the network, not one batch of two: on two CPU cores the batch was slower)
        looks = self._detect_crops_raw(image, [roi] if roi2 is None else [roi, roi2], uv_kin)
        uv, kcov, conf, ms = looks[0]
        timings.update(ms)
        if roi2 is not None:
            # Every keypoint that both the kinematics and the close crop's heat map put well inside it (near
            # its edge a heat map is cut off) is the two looks' combination, each weighted by its inverse
            # covariance: a look that is unsure counts for little.
            uv2, kcov2, conf2, ms2 = looks[1]
            refined = _inside(uv_kin, roi2, 0.05) & _inside(uv2, roi2, 0.05)
            uv, kcov, conf = uv.copy(), kcov.copy(), conf.copy()
            if refined.any():
                i1, i2 = np.linalg.inv(kcov[refined]), np.linalg.inv(kcov2[refined])
                c = np.linalg.inv(i1 + i2)
                uv[refined] = (c @ (i1 @ uv[refined, :, None] + i2 @ uv2[refined, :, None]))[..., 0]
                kcov[refined] = 0.5 * (c + np.swapaxes(c, -1, -2))
                conf[refined] = np.maximum(conf[refined], conf2[refined])
            timings.update({f"{k}_refine": v for k, v in ms2.items()})
        # the crops' own times overlap when they run side by side: the whole call's, as the caller waited for it
        timings["observe"] = (time.perf_counter() - t0) * 1e3
        return Observation(keypoints=uv, keypoint_covariance=kcov, confidence=conf, roi=roi, joints=q,
                           camera=camera, camera_from_base=T_cb, seed_source=seed_source,
                           keypoints_base=P_base, ee_in_base=T_be, timings_ms=timings, generation=self._generation,
                           refine_roi=roi2, refined=refined)

    @torch.inference_mode()
    def solve(self, obs: Observation, joint_sigma_scale: float = 1.0) -> Estimate:
        """The solver's half of :meth:`estimate`: keypoints of an :meth:`observe` call -> pose with covariance.

        Applies the variance factors, the joint prior and the published-covariance factor
        as they stand now, and updates the tracked camera-from-base.
        """
        cfg = self.config
        timings = dict(obs.timings_ms)
        t0 = time.perf_counter()
        uv, conf, roi, camera = obs.keypoints, obs.confidence, obs.roi, obs.camera
        kcov = obs.keypoint_covariance * self.variance_factor
        q = torch.as_tensor(obs.joints, dtype=torch.float64)[None]
        P_base, T_be = obs.keypoints_base, obs.ee_in_base
        T_cb, seed_source = obs.camera_from_base, obs.seed_source
        if T_cb is None:
            T_cb = self._pnp_seed(P_base, uv, camera)
            seed_source = "pnp"
        mask = torch.as_tensor(conf >= cfg.min_confidence)
        kin_pose = T_cb @ T_be if T_cb is not None else None
        if T_cb is None:
            sol_msg = "no seed: too few keypoints agree on a camera pose (PnP failed)"
            est = self._failed(uv, kcov, conf, roi, sol_msg, cfg.mode)
            est.timings_ms, est.refine_roi = timings, obs.refine_roi
            return est

        uv_t = torch.as_tensor(uv, dtype=torch.float64)[None]
        cov_t = torch.as_tensor(kcov, dtype=torch.float64)[None]
        cam_prior = None
        if cfg.camera_prior_sigma_m > 0 and seed_source == "extrinsic":
            cam_prior = (cfg.camera_prior_sigma_m, cfg.camera_prior_sigma_rad)
        if cfg.mode == "articulated":
            sol = solve_pose("articulated", uv_t, cov_t, camera, robot=self.robot, joints=q,
                             initial_camera_from_base=torch.as_tensor(T_cb)[None],
                             joint_sigma=self.joint_sigma() * joint_sigma_scale,
                             camera_prior_sigma=cam_prior,
                             mask=mask[None], config=cfg.solver)
        else:
            idx = self._rigid_idx
            P_ee = self.robot.keypoints_in_ee(q, idx)
            sol = solve_pose("rigid", uv_t[:, idx], cov_t[:, idx], camera, points=P_ee,
                             initial_pose=torch.as_tensor(T_cb @ T_be)[None], mask=mask[None, idx],
                             config=cfg.solver)
        timings["solver"] = (time.perf_counter() - t0) * 1e3
        est = self._to_estimate(sol, uv, kcov, conf, roi, cfg.mode, kin_pose, seed_source)
        est.refine_roi = obs.refine_roi
        track = est.converged and cfg.track_camera and obs.generation == self._generation
        if track and seed_source == "extrinsic":
            # the extrinsic seeds every frame while it lasts; should it go, the first frame without it
            # sets the uncertainty the ones after it are held to (its prior made these ones tighter)
            self._tracked_sigma = None
        elif track:
            # A frame lost in the image (metres off, with metres of uncertainty) must not replace the seed
            # the frames before it left.
            sigma = float(np.sqrt(max(np.linalg.eigvalsh(est.covariance[:3, :3]).max(), 0.0)))
            ref = self._tracked_sigma
            track = cfg.track_max_sigma_ratio <= 0 or ref is None or sigma <= cfg.track_max_sigma_ratio * ref
            if track:
                self._tracked_sigma = sigma
        if track and cfg.mode == "articulated":
            self._camera_from_base = est.camera_from_base
        elif track and cfg.mode == "rigid":
            self._camera_from_base = est.pose @ np.linalg.inv(T_be)
        timings["total"] = timings.get("observe", 0.0) + timings["solver"]
        est.timings_ms = timings
        return est

    def _failed(self, uv, kcov, conf, roi, msg, mode) -> Estimate:
        big = np.eye(6) * 1e6
        return Estimate(pose=np.full((4, 4), np.nan), covariance=big, converged=False, message=msg,
                        keypoints=uv, keypoint_covariance=kcov, confidence=conf,
                        inliers=np.zeros(len(uv), bool), residual=float("nan"), residual_px=float("nan"),
                        iterations=0, mode=mode, roi=roi)

    def _to_estimate(self, sol: PoseSolution, uv, kcov, conf, roi, mode, kin_pose, seed_source) -> Estimate:
        inl = np.zeros(len(uv), bool)
        if mode == "rigid":
            inl[self._rigid_idx] = sol.inliers[0].numpy()
        else:
            inl = sol.inliers[0].numpy()
        return Estimate(
            pose=sol.pose[0].detach().numpy(),
            covariance=sol.covariance[0].detach().numpy() * (self.pose_covariance_scale if seed_source == "extrinsic"
                                                             else self.pose_covariance_scale_no_extrinsic),
            converged=bool(sol.converged[0]), message=sol.message[0], keypoints=uv, keypoint_covariance=kcov,
            confidence=conf, inliers=inl, residual=float(sol.residual[0]), residual_px=float(sol.residual_px[0]),
            iterations=int(sol.iterations[0]), mode=mode,
            camera_from_base=None if sol.camera_from_base is None else sol.camera_from_base[0].detach().numpy(),
            joints=None if sol.joints is None else sol.joints[0].detach().numpy(),
            joint_covariance=None if sol.joint_covariance is None else sol.joint_covariance[0].detach().numpy(),
            kinematic_pose=kin_pose, roi=roi, seed_source=seed_source)
