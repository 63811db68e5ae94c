"""The ROS 2 node: camera frames + joint states in, end-effector pose with covariance out (FIG. 3 at frame rate).

One class, :class:`PoseEstimatorNode`. Callbacks only store messages; a worker
thread takes the *newest* image (older unprocessed frames are dropped and
counted, never queued), converts it, interpolates the joints at its stamp and
hands everything to :class:`pose_estimator.estimator.Estimator`. All
estimation lives in the core; this module converts messages and publishes.

Topics (relative names: remap them):

=============================  ====  ==========================================  ====================
name                           dir   type                                        QoS
=============================  ====  ==========================================  ====================
``image``                      in    sensor_msgs/Image                           sensor data
``image/compressed``           in    sensor_msgs/CompressedImage (``image_transport: compressed``)
``camera_info``                in    sensor_msgs/CameraInfo                      sensor data
``joint_states``               in    sensor_msgs/JointState                      best effort, depth 200
``robot_description``          in    std_msgs/String (URDF)                      transient local
``/tf_static``                 in    tf2_msgs/TFMessage (``camera_extrinsic_from_tf``)
``~/pose``                     out   geometry_msgs/PoseWithCovarianceStamped     reliable
``~/keypoints``                out   pose_estimator/KeypointArray                reliable
``~/status``                   out   pose_estimator/EstimateStatus               reliable
``~/joint_states_corrected``   out   sensor_msgs/JointState (articulated mode)   reliable
``~/debug_image``              out   sensor_msgs/Image rgb8 (only drawn when subscribed)
``/tf``                        out   camera frame -> ``<ee>_estimated`` (+ base -> ``<camera>_estimated``)
``/diagnostics``               out   diagnostic_msgs/DiagnosticArray             1 Hz
=============================  ====  ==========================================  ====================

Bad input never stops the node: each frame that cannot be used is counted,
logged (throttled per kind) and reported on ``/diagnostics`` with the reason;
no pose is published for it. Only start-up errors (model file missing or
broken, invalid parameters) end the process, with one clear line.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

import rclpy
import rclpy.executors
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, JointState
from std_msgs.msg import String

from pose_estimator.msg import EstimateStatus, Keypoint, KeypointArray

from ..config import EstimatorConfig, from_dict
from ..estimator import Estimator, Observation
from ..geometry import CameraModel, quaternion_from_matrix
from ..model_io import load_model
from ..robot import RobotDefinition, RobotModel
from .debug_draw import draw_debug
from .diagnostics import ERROR, OK, WARN, Counters, WindowStats, diagnostic_status
from .image_conversion import ImageConversionError, msg_to_rgb8, numpy_to_image_msg
from .joint_history import JointHistory
from .qos import latched_qos, output_qos, sensor_qos
from .tf_publisher import StaticTransformCache, TransformSender, transform_msg

__all__ = ["PoseEstimatorNode", "NodeStartupError", "main", "NODE_PARAMETERS", "estimator_parameters"]


class NodeStartupError(RuntimeError):
    """The node cannot start (bad model file, bad parameters); the message says what to fix."""


# name -> (default, description, read_only, (min, max) or None). The estimator's own
# settings are declared separately as ``estimator.*`` from EstimatorConfig.
_DECLARED_AFTER_THE_MODEL = {"pipeline"}  # defaults that depend on the model file (declared once it is loaded)
NODE_PARAMETERS: dict[str, tuple[Any, str, bool, tuple | None]] = {
    "model_path": ("", "Trained model (.safetensors). Empty: resource/models/<robot>.safetensors or "
                       "resource/models/default.safetensors.", True, None),
    "device": ("cpu", "torch device for inference ('cpu', 'cuda', 'cuda:0').", True, None),
    "torch_threads": (1, "torch intra-op threads for inference (process-wide); 0 keeps torch's default (all "
                         "cores). One leaves the other cores to DDS and the executor: more threads spin in "
                         "OpenMP and starve message delivery on small CPUs. Raise it on a large CPU.", True,
                      (0, 256)),
    "pipeline": (True, "Two worker threads: the network of one frame runs while the solver finishes the one "
                       "before, for more poses per second. False: one thread does both. Default: true where the "
                       "CPU has a core for the solver beside the network's crops (each crop run side by side takes "
                       "one: estimator.parallel_crops), else false (there the solver thread only slows them).",
                 True, None),
    "image_transport": ("raw", "'raw' subscribes to 'image' (sensor_msgs/Image); 'compressed' to "
                               "'image/compressed' (sensor_msgs/CompressedImage).", True, None),
    "image_qos": ("sensor_data", "QoS of the image and camera_info subscriptions: 'sensor_data' (best effort, the ROS "
                                 "convention for cameras) or 'reliable' (no frame lost in transport, e.g. large "
                                 "images over a busy network stack; needs a reliable publisher).", True, None),
    "urdf_file": ("", "URDF file for the kinematics. Empty: the robot_description topic, else the URDF the "
                      "robot definition names.", True, None),
    "use_robot_description_topic": (True, "Take the URDF from the 'robot_description' topic (transient local) "
                                          "when urdf_file is empty.", True, None),
    "robot_description_timeout_s": (2.0, "Seconds to wait for robot_description before falling back to the "
                                         "robot definition's URDF.", True, (0.0, 3600.0)),
    "camera_frame": ("", "Frame of the published pose. Empty: the image's header.frame_id (the camera "
                         "optical frame).", True, None),
    "ee_frame": ("", "Child frame of the published TF. Empty: '<end_effector>_estimated'. Must not be a frame "
                     "another node publishes (a frame has one parent).", True, None),
    "base_frame": ("", "The robot's base frame. Empty: the robot definition's base_link.", True, None),
    "publish_tf": (True, "Broadcast camera_frame -> ee_frame on /tf.", True, None),
    "publish_camera_tf": (False, "Also broadcast base_frame -> camera_estimated_frame (the estimated "
                                 "extrinsic; articulated mode).", True, None),
    "camera_estimated_frame": ("", "Child frame of the estimated extrinsic. Empty: '<camera_frame>_estimated'.",
                               True, None),
    "camera_extrinsic_from_tf": (False, "Seed (and softly constrain) camera-from-base with the base_frame -> "
                                        "camera_frame transform from /tf_static (a hand-eye calibration).",
                                 True, None),
    "joint_history_s": (2.0, "Seconds of joint states kept for interpolation at image stamps.", True,
                        (0.05, 60.0)),
    "joint_max_age_s": (0.1, "Joint states farther than this from the image stamp are stale: the joint prior "
                             "is widened, the covariance inflated, diagnostics warn.", True, (0.0, 60.0)),
    "joint_wait_s": (0.1, "How long a frame may wait for the first joint state stamped after it, so the joints "
                          "are interpolated at the image stamp rather than held from before it (0: never wait).",
                     False, (0.0, 10.0)),
    "time_jump_s": (0.25, "A stamp this much older than the previous one means time went backwards (bag "
                          "loop): buffers and tracking are reset.", True, (0.0, 3600.0)),
    "stale_joint_sigma_scale": (10.0, "Factor on the joint prior sigma when joint states are stale.", False,
                                (1.0, 1e6)),
    "stale_covariance_scale": (4.0, "Factor on the published covariance when joint states are stale.", False,
                               (1.0, 1e6)),
    "diagnostics_period_s": (1.0, "Period of /diagnostics.", True, (0.05, 60.0)),
    "stats_window_s": (5.0, "Window of the rate and latency statistics.", True, (0.5, 600.0)),
    "hardware_id": ("", "diagnostic hardware_id. Empty: the node's fully qualified name.", True, None),
    "log_throttle_s": (5.0, "At most one log line per kind of problem per this many seconds.", False,
                       (0.0, 3600.0)),
    "debug_image_sigma": (2.0, "Covariance ellipses in the debug image are drawn at this many sigma.", False,
                          (0.1, 10.0)),
}

_PARAM_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}


@dataclasses.dataclass
class _Observed:
    """A frame the network has seen, with what the solver and the publishers need of it."""

    estimator: Estimator  # the one that saw it (the robot model may change meanwhile)
    obs: Observation
    header: Any  # the image's std_msgs/Header
    rgb: np.ndarray
    t_received: float  # monotonic
    t_start: float  # monotonic, when the worker took it
    observe_ms: float
    frame_id: str
    camera: CameraModel
    stale: bool


def _field_comments(cls) -> dict[str, str]:
    """``#: text`` comments above dataclass fields (their documentation) by field name."""
    out: dict[str, str] = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    pending: list[str] = []
    for line in lines:
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+=", s)
        if m and pending:
            out[m.group(1)] = " ".join(pending)
        pending = [] if not s.startswith("#") else pending
    return out


def estimator_parameters(cfg: EstimatorConfig | None = None, prefix: str = "estimator") -> dict[str, tuple[Any, str]]:
    """Every leaf of :class:`EstimatorConfig` as ``{'estimator.solver.max_iterations': (default, doc)}``.

    The dataclass stays the one source of defaults: the node declares these,
    the YAML in ``config/`` sets them, :func:`pose_estimator.config.from_dict` checks them.
    """
    cfg = cfg or EstimatorConfig()
    out: dict[str, tuple[Any, str]] = {}
    docs = _field_comments(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(estimator_parameters(v, f"{prefix}.{f.name}"))
        elif type(v) in _PARAM_TYPES:
            out[f"{prefix}.{f.name}"] = (v, docs.get(f.name, f.name.replace("_", " ")))
    return out


def _nest(flat: dict[str, Any], prefix: str = "estimator.") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key[len(prefix):].split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    return out


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def default_model_path(robot: str) -> list[Path]:
    """Where an empty ``model_path`` looks, in order."""
    from ..robot import resource_dir

    try:
        res = resource_dir()
    except FileNotFoundError:
        return []
    name = Path(robot).stem
    return [res / "models" / f"{name}.safetensors", res / "models" / "default.safetensors"]


class PoseEstimatorNode(Node):
    """Camera + joint states -> end-effector pose with covariance (see the module docstring)."""

    def __init__(self, node_name: str = "pose_estimator", **kwargs):
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        p = self._p
        self.config = self._estimator_config()
        self._throttle_s = float(p("log_throttle_s"))
        self._last_log: dict[str, float] = {}
        self.counters = Counters()
        window = float(p("stats_window_s"))
        self.rate_stats = WindowStats(window)  # poses published
        self.frame_stats = WindowStats(window)  # frames solved (pose or refusal)
        self.latency_stats = WindowStats(window)  # image received -> status published (ms)
        self.processing_stats = WindowStats(window)  # worker: took frame -> status published (ms)
        self.estimator_stats = WindowStats(window)  # Estimator.estimate alone (ms)
        self.stamp_age_stats = WindowStats(window)  # wall clock - image stamp at publish (ms)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)

        # --- the model: loaded now so a bad file stops start-up with a clear message
        import torch

        if int(p("torch_threads")) > 0:
            torch.set_num_threads(int(p("torch_threads")))
        try:
            self.definition = RobotDefinition.from_yaml(self.config.robot)
        except (OSError, ValueError) as e:
            raise NodeStartupError(f"robot definition '{self.config.robot}': {e}") from e
        self.model_path = self._resolve_model_path(str(p("model_path")))
        self.device = str(p("device"))
        try:
            self.net, self.model_info = load_model(self.model_path, device=self.device)
        except FileNotFoundError as e:
            raise NodeStartupError(f"model file not found: {self.model_path} (set the model_path parameter)") from e
        except ValueError as e:  # ModelFormatError is a ValueError
            raise NodeStartupError(f"cannot load model {self.model_path}: {e}") from e
        names = self.model_info.get("keypoint_names") or []
        if names and names != self.definition.keypoint_names:
            raise NodeStartupError(f"model {self.model_path} was trained for keypoints {names}, but robot "
                                   f"'{self.definition.name}' defines {self.definition.keypoint_names}")
        if getattr(self.net.config, "num_keypoints", len(self.definition.keypoints)) != len(self.definition.keypoints):
            raise NodeStartupError(f"model {self.model_path} predicts {self.net.config.num_keypoints} keypoints, "
                                   f"robot '{self.definition.name}' defines {len(self.definition.keypoints)}")

        self._declare("pipeline", self._pipeline_default())  # its default depends on the model's crops

        # --- frames
        self.base_frame = str(p("base_frame")) or self.definition.base_link
        self.ee_frame = str(p("ee_frame")) or f"{self.definition.end_effector}_estimated"
        self.camera_frame_param = str(p("camera_frame"))
        own = {self.definition.base_link, self.definition.end_effector} | {k.link for k in self.definition.keypoints}
        if self.ee_frame in own:
            raise NodeStartupError(f"ee_frame '{self.ee_frame}' is a link of the robot, which robot_state_publisher "
                                   f"already publishes (a TF frame has one parent); use e.g. "
                                   f"'{self.ee_frame}_estimated'")
        self.camera_estimated_frame = str(p("camera_estimated_frame"))
        if self.camera_estimated_frame and self.camera_estimated_frame in (self.camera_frame_param, *own):
            raise NodeStartupError(f"camera_estimated_frame '{self.camera_estimated_frame}' names a frame another "
                                   "node owns; use a new name")
        if str(p("image_qos")) not in ("sensor_data", "reliable"):
            raise NodeStartupError(f"image_qos must be 'sensor_data' or 'reliable', got '{p('image_qos')}'")
        if str(p("image_transport")) not in ("raw", "compressed"):
            raise NodeStartupError(f"image_transport must be 'raw' or 'compressed', got '{p('image_transport')}'")
        self.hardware_id = str(p("hardware_id")) or self.get_fully_qualified_name()

        # --- state shared between callbacks and the worker (guarded by self._lock)
        self.estimator = None
        self.history: JointHistory | None = None
        self._urdf_source = ""
        self._pending_urdf: tuple[str, str] | None = None
        self._pending_frame: tuple[Any, float] | None = None
        self._camera: CameraModel | None = None
        self._camera_key: tuple | None = None
        self._camera_error = ""
        self._camera_frame_from_info = ""
        self._last_image_stamp_ns: int | None = None
        self._reset_tracking = False
        self._last_outcome = ("waiting", "no image received yet")
        self._last_status: EstimateStatus | None = None
        self._last_joint_age_s = float("nan")
        self._last_joint_error = ""
        self._stop = False
        self.frames_finished = 0  # frames the worker is done with, whatever the outcome (tests wait on it)
        self._observed: _Observed | None = None  # seen by the network, waiting for the solver thread
        self._early_joints: list[tuple[int, list, list]] = []

        # --- publishers
        qo = output_qos()
        self.pose_pub = self.create_publisher(PoseWithCovarianceStamped, "~/pose", qo)
        self.keypoints_pub = self.create_publisher(KeypointArray, "~/keypoints", qo)
        self.status_pub = self.create_publisher(EstimateStatus, "~/status", qo)
        self.joints_pub = (self.create_publisher(JointState, "~/joint_states_corrected", qo)
                           if self.config.mode == "articulated" else None)
        self.debug_pub = self.create_publisher(Image, "~/debug_image", output_qos(depth=2))
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", output_qos())
        self.tf_sender = TransformSender(self) if (p("publish_tf") or p("publish_camera_tf")) else None
        self.static_tf = StaticTransformCache(self) if p("camera_extrinsic_from_tf") else None

        # --- subscriptions
        # Depth 2: only the newest frame matters (the worker drops older ones anyway).
        image_qos = sensor_qos(depth=2) if p("image_qos") == "sensor_data" else output_qos(depth=2)
        if p("image_transport") == "compressed":
            self.image_sub = self.create_subscription(CompressedImage, "image/compressed", self._on_image, image_qos)
        else:
            self.image_sub = self.create_subscription(Image, "image", self._on_image, image_qos)
        info_qos = sensor_qos(depth=5) if p("image_qos") == "sensor_data" else output_qos(depth=5)
        self.info_sub = self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, info_qos)
        # Deep enough for a burst of 1 kHz joint states while the executor is busy.
        self.joint_sub = self.create_subscription(JointState, "joint_states", self._on_joint_states,
                                                  sensor_qos(depth=200))

        # Timers run on wall time: with use_sim_time a played recording's /clock jumps by years and loops back.
        self._steady = Clock(clock_type=ClockType.STEADY_TIME)
        # --- the robot's URDF: file, topic (with a fall-back), or the definition's own
        urdf_file = str(p("urdf_file"))
        self._urdf_timer = None
        self.urdf_sub = None
        if urdf_file:
            try:
                xml = Path(urdf_file).read_text()
            except OSError as e:
                raise NodeStartupError(f"cannot read urdf_file '{urdf_file}': {e}") from e
            self._build_estimator(xml, f"file {urdf_file}", startup=True)
        elif p("use_robot_description_topic"):
            self.urdf_sub = self.create_subscription(String, "robot_description", self._on_robot_description,
                                                     latched_qos())
            self._urdf_timer = self.create_timer(max(float(p("robot_description_timeout_s")), 1e-3),
                                                 self._on_urdf_timeout, clock=self._steady)
        else:
            self._build_estimator(None, f"robot definition '{self.definition.name}'", startup=True)

        self.diag_timer = self.create_timer(float(p("diagnostics_period_s")), self._publish_diagnostics,
                                            clock=self._steady)
        self._worker = threading.Thread(target=self._work, name="pose_estimator_worker", daemon=True)
        self._solver_thread = None
        if p("pipeline"):
            self._solver_thread = threading.Thread(target=self._solve_work, name="pose_estimator_solver",
                                                   daemon=True)
            self._solver_thread.start()
        self._worker.start()
        self.get_logger().info(
            f"model {self.model_path} ({self.config.mode}, robot '{self.definition.name}'); publishing "
            f"{self.pose_pub.topic_name} and TF -> '{self.ee_frame}' via "
            f"{self.tf_sender.backend if self.tf_sender else 'nothing'}")

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        for name in NODE_PARAMETERS:
            if name not in _DECLARED_AFTER_THE_MODEL:
                self._declare(name)
        for name, (default, doc) in estimator_parameters().items():
            desc = ParameterDescriptor(name=name, type=_PARAM_TYPES[type(default)],
                                       description=f"{doc} (EstimatorConfig; config/estimator.yaml)",
                                       read_only=True)
            self.declare_parameter(name, default, desc)

    def _declare(self, name: str, default: Any = None) -> None:
        nominal, doc, read_only, rng = NODE_PARAMETERS[name]
        default = nominal if default is None else default
        desc = ParameterDescriptor(name=name, type=_PARAM_TYPES[type(nominal)], description=doc, read_only=read_only)
        if rng is not None and isinstance(nominal, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(rng[0]), to_value=float(rng[1]))]
        elif rng is not None and isinstance(nominal, int):
            desc.integer_range = [IntegerRange(from_value=int(rng[0]), to_value=int(rng[1]), step=1)]
        self.declare_parameter(name, default, desc)

    def _pipeline_default(self) -> bool:
        """Whether the CPU has a core for the pipeline's solver thread beside the network's crops (each crop that
        runs side by side takes one). On 2 cores with the shipped model's two crops the solver thread only slows
        them (benchmarks/node_rate.py); with one crop it has the other core."""
        cfg = self.config
        two = (cfg.refine_end_effector and cfg.parallel_crops
               and (self.model_info.get("extra") or {}).get("refine_margin") is not None)
        return (os.cpu_count() or 1) > (2 if two else 1)

    def _p(self, name: str):
        return self.get_parameter(name).value

    def _estimator_config(self) -> EstimatorConfig:
        flat = {name: self._p(name) for name in estimator_parameters()}
        try:
            return from_dict(EstimatorConfig, _nest(flat), "parameters 'estimator'")
        except (TypeError, ValueError) as e:
            raise NodeStartupError(f"invalid estimator parameters: {e}") from e

    def _resolve_model_path(self, given: str) -> Path:
        if given:
            return Path(given).expanduser()
        candidates = default_model_path(self.config.robot)
        for c in candidates:
            if c.is_file():
                return c
        raise NodeStartupError("no model: the model_path parameter is empty and no default model exists "
                               f"(looked for {[str(c) for c in candidates]})")

    # ------------------------------------------------------------------ logging
    def _log(self, kind: str, level: str, text: str) -> None:
        """One line per ``kind`` per ``log_throttle_s`` (no floods from a bad stream)."""
        now = time.monotonic()
        if now - self._last_log.get(kind, -1e18) < self._throttle_s:
            return
        self._last_log[kind] = now
        # One call site per severity: rclpy remembers the severity of each call site.
        logger = self.get_logger()
        if level == "error":
            logger.error(text)
        elif level == "warning":
            logger.warning(text)
        else:
            logger.info(text)

    # ------------------------------------------------------------------ callbacks (executor thread)
    def _on_image(self, msg) -> None:
        with self._cv:
            self.counters.frames_received += 1
            if self._pending_frame is not None:
                self.counters.frames_dropped += 1  # the worker is busy: only the newest frame matters
            self._pending_frame = (msg, time.monotonic())
            self._cv.notify_all()  # the worker and the solver thread wait on it

    def _on_camera_info(self, msg: CameraInfo) -> None:
        key = (tuple(msg.k), tuple(msg.d), msg.width, msg.height, msg.distortion_model)
        with self._lock:
            self._camera_frame_from_info = msg.header.frame_id
            if key == self._camera_key:
                return
            self._camera_key = key
        try:
            cam = CameraModel.from_camera_info(msg.k, msg.d, msg.width, msg.height, msg.distortion_model)
            err = ""
        except ValueError as e:
            cam, err = None, f"camera_info rejected: {e}"
        with self._lock:
            self._camera, self._camera_error = cam, err
            if err:
                self.counters.bad_camera_info += 1
        if err:
            self._log("camera_info", "error", err)

    def _on_joint_states(self, msg: JointState) -> None:
        stamp = _stamp_ns(msg.header.stamp)
        with self._lock:
            history = self.history
            if history is None:
                # No robot model yet: keep the sample for when it is built.
                self._early_joints = self._early_joints[-500:] + [(stamp, list(msg.name), list(msg.position))]
                return
            try:
                jumped = history.add(stamp, msg.name, msg.position)
                self._last_joint_error = ""
                self._cv.notify_all()  # a frame may be waiting for this sample
            except ValueError as e:
                self.counters.bad_joint_states += 1
                self._last_joint_error = f"joint_states rejected: {e}"
                jumped = None
        if jumped is None:
            self._log("joint_states", "warning", self._last_joint_error)
        elif jumped:
            self._on_time_jump("joint_states")

    def _on_time_jump(self, source: str) -> None:
        with self._lock:
            self.counters.time_jumps += 1
            self._reset_tracking = True
        self._log("time_jump", "info", f"{source} stamp jumped backwards (recording looped?): buffers and tracking "
                                       "reset")

    def _on_robot_description(self, msg: String) -> None:
        with self._cv:
            self._pending_urdf = (msg.data, "topic robot_description")
            self._cv.notify_all()  # the worker and the solver thread wait on it

    def _on_urdf_timeout(self) -> None:
        # One shot. A robot_description that arrived but could not be used also ends here: the robot
        # definition's own URDF (the one its keypoints were defined on) beats having no model at all.
        self._urdf_timer.cancel()
        with self._cv:
            if self.estimator is not None or self._pending_urdf is not None:
                return
            self._log("urdf_fallback", "warning", "no usable robot_description within "
                                                  f"{self._p('robot_description_timeout_s')} s; using the URDF of "
                                                  f"robot definition '{self.definition.name}'")
            self._pending_urdf = (None, f"robot definition '{self.definition.name}' (robot_description timeout)")
            self._cv.notify_all()  # the worker and the solver thread wait on it

    # ------------------------------------------------------------------ the robot model
    def _build_estimator(self, urdf_xml: str | None, source: str, startup: bool = False) -> None:
        try:
            robot = RobotModel.from_yaml(self.config.robot, robot_description=urdf_xml)
            est = Estimator(robot, self.net, self.config, device=self.device, model_info=self.model_info)
            est.warm_up()
        except (OSError, ValueError) as e:
            msg = f"cannot build the robot model from {source}: {e}"
            if startup:
                raise NodeStartupError(msg) from e
            self._log("urdf", "error", msg)
            with self._lock:
                self._last_outcome = ("error", msg)
            return
        p = self._p
        with self._lock:
            if self.history is None or self.history.joint_names != robot.joint_names:
                self.history = JointHistory(robot.joint_names, history_s=float(p("joint_history_s")),
                                            max_age_s=float(p("joint_max_age_s")),
                                            jump_back_s=float(p("time_jump_s")))
                for stamp, names, pos in self._early_joints:
                    try:
                        self.history.add(stamp, names, pos)
                    except ValueError:
                        pass
            self._early_joints = []
            self.estimator = est
            self._urdf_source = source
        self.get_logger().info(f"robot model from {source}: {robot.n_joints} joints, {robot.num_keypoints} keypoints")

    # ------------------------------------------------------------------ the worker
    def _set_threads(self) -> None:
        n_threads = int(self._p("torch_threads"))
        if n_threads > 0:
            import torch

            torch.set_num_threads(n_threads)  # also in this thread: OpenMP teams are per calling thread

    def _work(self) -> None:
        """The worker: takes the newest frame, checks it, runs the network (and, without the pipeline, the rest)."""
        self._set_threads()
        while True:
            with self._cv:
                # With the pipeline, a frame is taken only once the solver has taken the one before: a frame
                # seen by the network must not wait out a whole solve while newer frames arrive.
                while not self._stop and self._pending_urdf is None and (
                        self._pending_frame is None or (self._solver_thread is not None and self._observed is not None)):
                    self._cv.wait(0.5)
                if self._stop:
                    return
                urdf, self._pending_urdf = self._pending_urdf, None
                frame = None
                if urdf is None:
                    frame, self._pending_frame = self._pending_frame, None
            handed_off = False
            try:
                if urdf is not None:
                    xml, source = urdf
                    current = self.estimator
                    if xml is None and current is None:
                        self._build_estimator(None, source)
                    elif xml is not None and (current is None or xml != current.robot.urdf_xml):
                        self._build_estimator(xml, source)
                elif frame is not None:
                    observed = self._observe(*frame)
                    if observed is not None and self._solver_thread is not None:
                        handed_off = self._hand_off(observed)
                    elif observed is not None:
                        self._finish(observed)
            except Exception as e:  # noqa: BLE001 - the worker must survive anything
                if self._stop or not self.context.ok():
                    return  # shutting down: publishers are gone, nothing to report
                self._internal_error(e)
            finally:
                if frame is not None and not handed_off:
                    with self._lock:
                        self.frames_finished += 1

    def _hand_off(self, observed: _Observed) -> bool:
        """Give a frame to the solver thread, waiting while it still has the one before; False when stopping."""
        with self._cv:
            while self._observed is not None and not self._stop:
                self._cv.wait(0.5)
            if self._stop:
                return False
            self._observed = observed
            self._cv.notify_all()
            return True

    def _solve_work(self) -> None:
        """The solver thread (``pipeline``): solves and publishes while the worker runs the next frame's network."""
        self._set_threads()
        while True:
            with self._cv:
                while not self._stop and self._observed is None:
                    self._cv.wait(0.5)
                if self._stop:
                    return
                observed, self._observed = self._observed, None
                self._cv.notify_all()  # the worker may hand over the next frame
            try:
                self._finish(observed)
            except Exception as e:  # noqa: BLE001 - the thread must survive anything
                if self._stop or not self.context.ok():
                    return
                self._internal_error(e)
            finally:
                with self._lock:
                    self.frames_finished += 1

    def _internal_error(self, e: Exception) -> None:
        with self._lock:
            self.counters.internal_errors += 1
            self._last_outcome = ("error", f"internal error: {e!r}")
        self._log("internal", "error", f"internal error while processing a frame: {e!r}\n"
                                       f"{traceback.format_exc()}")

    def _reject(self, kind: str, reason: str, level: str = "warning", counter: str | None = None,
                outcome: str = "rejected") -> None:
        with self._lock:
            if counter:
                setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            self._last_outcome = (outcome, reason)
        self._log(kind, level, reason)

    def _observe(self, msg, t_received: float) -> _Observed | None:
        """Check a frame, find its joints, run the network; None where the frame is rejected (reported)."""
        t_start = time.monotonic()
        stamp = msg.header.stamp
        stamp_ns = _stamp_ns(stamp)
        with self._lock:
            self.counters.frames_processed += 1
            last = self._last_image_stamp_ns
            self._last_image_stamp_ns = stamp_ns
        if last is not None and stamp_ns < last - int(float(self._p("time_jump_s")) * 1e9):
            self._on_time_jump("image")
        try:
            rgb = msg_to_rgb8(msg)
        except ImageConversionError as e:
            self._reject("image", f"image rejected: {e}", counter="bad_images", outcome="bad_input")
            return
        with self._lock:
            camera, camera_error = self._camera, self._camera_error
            estimator, history = self.estimator, self.history
            reset, self._reset_tracking = self._reset_tracking, False
            frame_id = self.camera_frame_param or msg.header.frame_id or self._camera_frame_from_info
        if estimator is None:
            self._reject("waiting", "waiting for the robot model (robot_description)", level="info",
                         outcome="waiting")
            return
        if reset:
            estimator.reset()
        if camera is None:
            reason = camera_error or "no CameraInfo received yet on 'camera_info'"
            self._reject("camera_info", f"frame skipped: {reason}", outcome="bad_input" if camera_error else "waiting")
            return
        if (rgb.shape[1], rgb.shape[0]) != (camera.width, camera.height):
            self._reject("size", f"image is {rgb.shape[1]}x{rgb.shape[0]} but camera_info says "
                                 f"{camera.width}x{camera.height}", counter="bad_images", outcome="bad_input")
            return
        if not frame_id:
            frame_id = "camera_optical_frame"
            self._log("frame_id", "warning", "image and camera_info have no frame_id and camera_frame is not set; "
                                             f"publishing in '{frame_id}'")
        with self._cv:
            # Wait (briefly, and letting the executor run) for a joint state stamped after the image.
            deadline = time.monotonic() + float(self._p("joint_wait_s"))
            while (history is not None and history.newest_stamp_ns is not None
                   and history.newest_stamp_ns < stamp_ns and not self._stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            lookup = history.lookup(stamp_ns) if history is not None else None
            joint_error = self._last_joint_error
        if lookup is None:
            self._reject("joints", "frame skipped: no joint states received yet"
                         + (f" ({joint_error})" if joint_error else ""), outcome="waiting")
            return
        if lookup.missing:
            self._reject("joints", f"frame skipped: joint states lack {lookup.missing}", outcome="bad_input")
            return
        self._last_joint_age_s = lookup.age_s
        stale = lookup.stale
        if stale:
            with self._lock:
                self.counters.stale_joint_frames += 1
            self._log("stale", "warning", f"joint states are {lookup.age_s * 1e3:.0f} ms from the image stamp "
                                          f"(> {self._p('joint_max_age_s') * 1e3:.0f} ms): vision only, covariance "
                                          "inflated")
        extrinsic = None
        if self.static_tf is not None:
            extrinsic = self.static_tf.lookup(frame_id, self.base_frame)  # T_camera_base
        t_est = time.monotonic()
        try:
            obs = estimator.observe(rgb, camera, lookup.positions, camera_from_base=extrinsic)
        except ValueError as e:
            self._reject("estimate", f"frame rejected: {e}", counter="bad_images", outcome="bad_input")
            return None
        return _Observed(estimator, obs, msg.header, rgb, t_received, t_start, (time.monotonic() - t_est) * 1e3,
                         frame_id, camera, stale)

    def _finish(self, observed: _Observed) -> None:
        """Solve a frame the network has seen and publish the outcome."""
        o = observed
        estimator, header, rgb, t_received, t_start = o.estimator, o.header, o.rgb, o.t_received, o.t_start
        frame_id, camera, stale = o.frame_id, o.camera, o.stale
        stamp = header.stamp
        stamp_ns = _stamp_ns(stamp)
        t_solve = time.monotonic()
        est = estimator.solve(o.obs, joint_sigma_scale=float(self._p("stale_joint_sigma_scale")) if stale else 1.0)
        est_ms = o.observe_ms + (time.monotonic() - t_solve) * 1e3
        self.estimator_stats.add(est_ms)

        # --- publish: keypoints and status for every processed frame, the pose only when trusted
        self._publish_keypoints(est, stamp, frame_id, camera)
        cov = np.asarray(est.covariance, dtype=np.float64)
        cov = 0.5 * (cov + cov.T)
        if stale:
            cov = cov * float(self._p("stale_covariance_scale"))
        reason = ""
        if not est.converged:
            reason = est.message or "solver did not converge"
        elif not np.all(np.isfinite(est.pose)) or not np.all(np.isfinite(cov)):
            reason = "non-finite pose or covariance"
        elif np.linalg.eigvalsh(cov).min() <= 0:
            reason = "covariance is not positive definite"
        status = self._status_msg(est, stamp, frame_id, reason)
        self.status_pub.publish(status)
        # Time per solved frame, whatever the outcome (a refusal costs the same work).
        t_pub = time.monotonic()
        self.latency_stats.add((t_pub - t_received) * 1e3)
        self.processing_stats.add((t_pub - t_start) * 1e3)
        self.frame_stats.add()
        if reason:
            with self._lock:
                self.counters.poses_rejected += 1
                self._last_status = status
            self._reject("pose", f"no pose published: {reason} (residual {est.residual:.3g}, "
                                 f"{int(est.inliers.sum())}/{len(est.inliers)} inliers)", outcome="rejected")
        else:
            self._publish_pose(est, cov, stamp, frame_id)
            self.rate_stats.add()
            age_ms = (time.time_ns() - stamp_ns) * 1e-6
            if abs(age_ms) < 60_000:  # meaningful only for live stamps
                self.stamp_age_stats.add(age_ms)
            with self._lock:
                self.counters.poses_published += 1
                self._last_status = status
                self._last_outcome = ("stale" if stale else "ok",
                                      "joint states stale: vision only, covariance inflated" if stale else "")
        if self.debug_pub.get_subscription_count() > 0:
            self._publish_debug(rgb, est, camera, header, frame_id, reason, stale)

    def _status_msg(self, est, stamp, frame_id: str, reason: str) -> EstimateStatus:
        s = EstimateStatus()
        s.header.stamp, s.header.frame_id = stamp, frame_id
        s.converged = bool(est.converged)
        s.residual = float(est.residual_px) if np.isfinite(est.residual_px) else float("nan")
        s.iterations = int(max(est.iterations, 0))
        s.inliers = int(np.asarray(est.inliers).sum())
        s.keypoints = int(len(est.keypoints))
        s.mode = str(est.mode)
        s.message = reason or est.message or ""
        return s

    def _publish_keypoints(self, est, stamp, frame_id: str, camera: CameraModel) -> None:
        arr = KeypointArray()
        arr.header.stamp, arr.header.frame_id = stamp, frame_id
        names = self.definition.keypoint_names
        kps = []
        for k, (uv, C, c) in enumerate(zip(est.keypoints, est.keypoint_covariance, est.confidence)):
            kp = Keypoint()
            kp.name = names[k] if k < len(names) else str(k)
            kp.x, kp.y = float(uv[0]), float(uv[1])
            kp.covariance = [float(v) for v in np.asarray(C, dtype=np.float64).reshape(4)]
            kp.confidence = float(np.clip(c, 0.0, 1.0))
            kp.visible = bool(np.isfinite(uv).all() and 0 <= uv[0] < camera.width and 0 <= uv[1] < camera.height
                              and c >= self.config.min_confidence)
            kps.append(kp)
        arr.keypoints = kps
        self.keypoints_pub.publish(arr)

    def _publish_pose(self, est, cov: np.ndarray, stamp, frame_id: str) -> None:
        T = np.asarray(est.pose, dtype=np.float64)
        msg = PoseWithCovarianceStamped()
        msg.header.stamp, msg.header.frame_id = stamp, frame_id
        import torch

        q = quaternion_from_matrix(torch.as_tensor(T[:3, :3])).numpy()
        pose = msg.pose.pose
        pose.position.x, pose.position.y, pose.position.z = (float(v) for v in T[:3, 3])
        pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w = (float(v) for v in q)
        msg.pose.covariance = [float(v) for v in cov.reshape(36)]  # row-major x y z rx ry rz (ROS order)
        self.pose_pub.publish(msg)
        if self.tf_sender is not None:
            tfs = []
            if self._p("publish_tf"):
                tfs.append(transform_msg(T, frame_id, self.ee_frame, stamp))
            if self._p("publish_camera_tf") and est.camera_from_base is not None:
                child = self.camera_estimated_frame or f"{frame_id}_estimated"
                tfs.append(transform_msg(np.linalg.inv(est.camera_from_base), self.base_frame, child, stamp))
            self.tf_sender.send(tfs)
        if self.joints_pub is not None and est.joints is not None:
            js = JointState()
            js.header.stamp, js.header.frame_id = stamp, ""
            js.name = list(self.estimator.robot.joint_names)
            js.position = [float(v) for v in est.joints]
            self.joints_pub.publish(js)

    def _publish_debug(self, rgb, est, camera, header, frame_id: str, reason: str, stale: bool) -> None:
        pose = None if reason else est.pose
        text = (f"REJECTED: {reason}" if reason else
                f"res {est.residual_px:.2f}px  inl {int(est.inliers.sum())}/{len(est.inliers)}"
                + ("  STALE JOINTS" if stale else ""))
        img = draw_debug(rgb, est.keypoints, est.keypoint_covariance, est.confidence, est.inliers, camera, pose,
                         text=text[:90], sigma=float(self._p("debug_image_sigma")),
                         min_confidence=self.config.min_confidence, rois=(est.roi, est.refine_roi))
        out = numpy_to_image_msg(img, "rgb8")
        out.header.stamp, out.header.frame_id = header.stamp, frame_id
        self.debug_pub.publish(out)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> tuple[int, str, dict[str, Any]]:
        """(level, message, key-values) as published on /diagnostics (also handy in tests)."""
        with self._lock:
            c = self.counters.as_dict()
            outcome, text = self._last_outcome
            status = self._last_status
            ready = self.estimator is not None
            camera_error = self._camera_error
            joint_error = self._last_joint_error
        level, message = OK, "publishing poses"
        if outcome == "waiting":
            level, message = WARN, text
        elif outcome in ("bad_input", "error"):
            level, message = ERROR, text
        elif outcome == "rejected":
            level, message = WARN, text
        elif outcome == "stale":
            level, message = WARN, text
        if camera_error and level < ERROR:
            level, message = ERROR, camera_error
        if joint_error and level < WARN:
            level, message = WARN, joint_error
        if c["frames_received"] == 0 and level < ERROR:
            level, message = WARN, "no image received yet on " + self.image_sub.topic_name
        values = {
            "rate_hz": self.rate_stats.rate(),
            "frame_rate_hz": self.frame_stats.rate(),
            "latency_ms_p50": self.latency_stats.percentile(50),
            "latency_ms_p95": self.latency_stats.percentile(95),
            "processing_ms_p50": self.processing_stats.percentile(50),
            "estimator_ms_p50": self.estimator_stats.percentile(50),
            "stamp_age_ms_p50": self.stamp_age_stats.percentile(50),
            **c,
            "residual_px": status.residual if status is not None else float("nan"),
            "iterations": status.iterations if status is not None else 0,
            "inliers": status.inliers if status is not None else 0,
            "converged": bool(status.converged) if status is not None else False,
            "joint_age_ms": self._last_joint_age_s * 1e3,
            "mode": self.config.mode,
            "pipeline": self._solver_thread is not None,
            "model": str(self.model_path),
            "robot_model": self._urdf_source if ready else "waiting for robot_description",
            "last_problem": text if outcome != "ok" else "",
        }
        return level, message, values

    def _publish_diagnostics(self) -> None:
        level, message, values = self.diagnostics_values()
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [diagnostic_status(f"{self.get_name()}: pose estimation", self.hardware_id, level, message,
                                        values)]
        self.diag_pub.publish(arr)

    # ------------------------------------------------------------------ shutdown
    def destroy_node(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for thread in (self._worker, self._solver_thread):
            if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
                thread.join(timeout=10.0)
        if self.estimator is not None:
            self.estimator.close()  # its second crop's helper thread
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Entry point of ``pose_estimator_node``: init, spin, destroy, shutdown; returns 1 on a start-up error."""
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = PoseEstimatorNode()
        rclpy.spin(node)
    except NodeStartupError as e:
        rclpy.logging.get_logger("pose_estimator").fatal(f"cannot start: {e}")
        code = 1
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    import sys

    sys.exit(main())
