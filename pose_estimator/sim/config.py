"""Generator settings as dataclasses: one source of defaults for the CLI, tests and benchmarks.

Every random choice the generator makes is drawn from a range or probability
named here, so a dataset's ``meta.json`` (which stores these settings) says
exactly how it was made. Ranges are ``(low, high)`` tuples, sampled uniformly
unless the field says otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "JointErrorModel",
    "TrajectoryConfig",
    "CameraConfig",
    "SceneConfig",
    "BoardSpec",
    "GeneratorConfig",
    "config_from_dict",
    "config_to_dict",
]

T = TypeVar("T")
Range = tuple[float, float]


@dataclass
class JointErrorModel:
    """How the measured joints differ from the true ones (FIG. 3: the "sloppy arm").

    Per sequence and per joint the generator draws a constant offset
    ``N(0, offset_std)`` and a backlash width ``b ~ U(backlash)``; per sample it
    adds noise ``N(0, noise_std)``. Backlash is a play (hysteresis) operator:
    ``measured`` lags the true position by ``b/2`` against the direction of
    motion (``measured = true - sign(velocity) * b/2``) and, after a reversal,
    stays put until the joint has travelled ``b`` the other way.
    Revolute joints use the ``*_deg`` fields; prismatic joints the ``*_m`` fields.
    The defaults put the kinematic end-effector position 1-3 cm off (Panda: median 1.5 cm, 90th percentile
    2.9 cm over random trajectories).
    """

    offset_std_deg: float = 1.0
    backlash_deg: Range = (0.5, 1.0)
    noise_std_deg: float = 0.07
    offset_std_m: float = 0.0
    backlash_m: Range = (0.0, 0.0)
    noise_std_m: float = 0.0001


@dataclass
class TrajectoryConfig:
    """Smooth joint trajectories: random waypoints joined by minimum-jerk segments."""

    #: waypoints stay this fraction of each joint's range away from its limits
    margin: float = 0.1
    #: each waypoint lies within +-step_deg of the previous one per joint (the first is uniform)
    step_deg: float = 45.0
    #: peak joint speed of a segment (rad/s, or m/s for prismatic joints), drawn per segment
    speed: Range = (0.3, 1.0)
    #: shortest segment (s)
    min_segment: float = 0.4
    #: probability that the arm holds still after a segment, and for how long (s)
    pause_probability: float = 0.3
    pause: Range = (0.2, 0.8)
    #: probability of a small back-and-forth after a segment (reversals show backlash)
    reversal_probability: float = 0.4
    reversal_deg: Range = (1.0, 6.0)


@dataclass
class CameraConfig:
    """Camera placement and intrinsics, drawn once per sequence (the camera is fixed)."""

    #: distance (m) from the camera to the point it looks at
    distance: Range = (0.8, 2.5)
    #: camera elevation above the base's horizontal plane (deg) and azimuth about base z (deg)
    elevation_deg: Range = (-5.0, 55.0)
    azimuth_deg: Range = (-180.0, 180.0)
    #: std of the roll about the optical axis (deg)
    roll_std_deg: float = 8.0
    #: horizontal extent (m) of the scene the image spans at the target distance (sets the focal length)
    view_width: Range = (0.6, 1.4)
    #: clamp on the horizontal field of view (deg)
    fov_deg: Range = (20.0, 95.0)
    #: std of the principal point offset from the image centre, as a fraction of width/height
    principal_point_std: float = 0.02
    #: std of fy/fx - 1
    aspect_std: float = 0.005
    #: std (m) of the look-at point around the arm's mean keypoint position
    target_jitter: float = 0.12
    #: probability that a sequence's camera is placed in front of the board (within board_facing_cone_deg of its
    #: normal at a random frame, looking at a point between the arm's centre and the board): a rig is set up to see
    #: its fiducial; otherwise the direction is uniform and the board faces the camera in ~1/4 of the frames
    board_facing_probability: float = 0.6
    board_facing_cone_deg: float = 35.0
    #: elevation band (deg) allowed for board-facing cameras (wider: the hand can face up or down)
    board_facing_elevation_deg: Range = (-35.0, 75.0)
    #: camera keeps this far (m) from every keypoint over the whole trajectory
    min_clearance: float = 0.3
    #: at least this fraction of keypoint projections (over the sequence) must land in the image
    min_in_view: float = 0.5
    #: plumb_bob distortion: probability a sequence has any, and the coefficient ranges
    distortion_probability: float = 0.5
    k1: Range = (-0.25, 0.1)
    k2: Range = (-0.05, 0.05)
    p_std: float = 0.0005
    k3: Range = (-0.01, 0.01)
    #: clipping planes of the renderer (m)
    near: float = 0.05
    far: float = 8.0


@dataclass
class SceneConfig:
    """Lighting, background, distractors, image degradations."""

    #: procedural background kinds (see :mod:`pose_estimator.sim.textures`)
    backgrounds: tuple[str, ...] = ("noise", "checker", "stripes", "gradient", "blobs")
    #: number of distractor primitives placed around the arm
    distractors: tuple[int, int] = (0, 4)
    #: probability that an object floats between camera and arm (partial occlusion)
    occluder_probability: float = 0.3
    #: tiny-renderer lighting
    light_ambient: Range = (0.3, 0.7)
    light_diffuse: Range = (0.3, 0.7)
    light_specular: Range = (0.0, 0.4)
    light_elevation_deg: Range = (20.0, 80.0)
    #: shadows double the render time; they are off in most sequences
    shadow_probability: float = 0.1
    #: photometric jitter, per sequence
    brightness: Range = (0.8, 1.2)
    gamma: Range = (0.8, 1.25)
    noise_std: Range = (0.0, 4.0)
    #: probability of motion blur on a frame; exposure (s) turns the hand's image speed into a kernel length
    blur_probability: float = 0.15
    exposure: Range = (0.02, 0.06)
    #: a keypoint is visible when its pixel shows its own link (or one jointed to it) and that surface is at
    #: most this far (m) in front of it. Keypoints at joint centres sit inside the link housings: for the
    #: Panda the seen surface is a median 5-10 cm in front of them, so the tolerance is a link radius plus a
    #: margin; it still hides points on the far side of a link (e.g. the far jaw of the hand, ~0.2 m)
    visibility_depth_tolerance: float = 0.12
    #: the board counts as visible when at least this fraction of its face is seen, at an angle of
    #: at most ``board_max_angle_deg`` between its normal and the line of sight, covering at least
    #: ``board_min_area_px`` pixels
    board_min_visible_fraction: float = 0.6
    board_max_angle_deg: float = 70.0
    board_min_area_px: float = 150.0


@dataclass
class BoardSpec:
    """A ChArUco board fixed to a link of the arm.

    Board frame (OpenCV's): origin at the board's top-left outer corner, x
    along the columns, y along the rows (down), z into the board; the printed
    face looks along -z. ``mount`` places the board: ``"auto"`` centres it
    on the +x side of ``link`` (default: the robot's end effector), facing
    +x of that link, 5 mm clear of the link's collision box; or give
    ``T_link_board`` explicitly (row-major 4x4).
    """

    dictionary: str = "DICT_4X4_50"
    squares_x: int = 4
    squares_y: int = 4
    square_length: float = 0.04
    marker_length: float = 0.03
    thickness: float = 0.005
    #: link it is fixed to; "" = the robot's end effector
    link: str = ""
    mount: str = "auto"
    T_link_board: tuple[float, ...] = ()
    #: texture resolution: pixels per square
    texture_px_per_square: int = 64

    @property
    def width(self) -> float:
        return self.squares_x * self.square_length

    @property
    def height(self) -> float:
        return self.squares_y * self.square_length


@dataclass
class GeneratorConfig:
    """Everything :func:`pose_estimator.sim.generate_dataset` needs."""

    #: robot definition: a name under resource/robots/ or a path to a keypoint YAML
    robot: str = "panda"
    sequences: int = 4
    frames_per_sequence: int = 60
    seed: int = 0
    #: image size; the board is detected in ~30 % of frames at 640x480 but far fewer at 320x256
    width: int = 640
    height: int = 480
    #: camera frame rate (Hz) and joint-state rate (Hz); joint_rate must be a multiple of fps
    fps: float = 30.0
    joint_rate: float = 120.0
    #: write a rosbag2 recording per sequence
    bag: bool = False
    #: rosbag2 storage: "mcap" or "sqlite3"
    bag_storage: str = "mcap"
    #: write the label mask (robot link / board / other) beside each image
    masks: bool = True
    #: stamp of the first frame of sequence i: start_time + i * sequence_spacing (s)
    start_time: float = 1_700_000_000.0
    sequence_spacing: float = 3600.0
    camera_frame: str = "camera_optical_frame"
    joint_errors: JointErrorModel = field(default_factory=JointErrorModel)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    board: BoardSpec = field(default_factory=BoardSpec)

    def __post_init__(self) -> None:
        if self.sequences < 0 or self.frames_per_sequence < 1:
            raise ValueError("sequences must be >= 0 and frames_per_sequence >= 1")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image size {self.width}x{self.height} is too small (min 16x16)")
        ratio = self.joint_rate / self.fps
        if self.fps <= 0 or ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(f"joint_rate ({self.joint_rate} Hz) must be a positive integer multiple of "
                             f"fps ({self.fps} Hz), so every image stamp is a joint-state stamp")
        if self.bag_storage not in ("mcap", "sqlite3"):
            raise ValueError(f"bag_storage must be 'mcap' or 'sqlite3', got '{self.bag_storage}'")

    @property
    def joint_steps_per_frame(self) -> int:
        return int(round(self.joint_rate / self.fps))


def config_from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping (YAML/JSON), recursing into nested dataclasses.

    Unknown keys raise ``ValueError`` (a typo must not fall back to a default);
    lists become tuples where the default is a tuple.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        has_factory = f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if has_factory else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{name}: expected a mapping, got {value!r}")
            kwargs[name] = config_from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{where}.{name}: expected a list, got {value!r}")
            kwargs[name] = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{name}: expected true/false, got {value!r}")
            kwargs[name] = value
        elif isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            kwargs[name] = float(value)
        elif default is not None and not isinstance(value, type(default)):
            raise ValueError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_to_dict(obj) -> dict[str, Any]:
    """A dataclass as plain JSON-able data (tuples become lists)."""
    def conv(v):
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(dataclasses.asdict(obj))
