"""The on-disk synthetic dataset (format version 1) and its lazy reader.

Layout (documented in ``pose_estimator/sim/README.md``)::

    DATASET/
      meta.json            settings, robot, keypoints, board, error model, seed (written first)
      COMPLETE             written last, once every planned sequence is in place
      seq_00000/           appears atomically (written as .tmp-..., then renamed)
        sequence.json      camera (K, dist, size, T_base_camera), realised joint errors, scene
        frames.jsonl       one JSON object per frame
        joints.jsonl       the joint-state stream (joint rate): true + measured
        images/000000.png  RGB
        masks/000000.png   labels: 0 background, 1 + link entry, 254 board, 255 other
        bag/               rosbag2 recording (with --bag)

All poses are 7-vectors ``[x, y, z, qx, qy, qz, qw]`` (metres, ROS quaternion
order); the reader turns them into 4x4 matrices. ``T_a_b`` maps points from
frame b to frame a; "base" is the robot definition's ``base_link``; "camera"
is the optical frame (z forward, x right, y down).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "SyntheticDataset",
    "SyntheticSequence",
    "SyntheticFrame",
    "pose7_to_matrix",
    "write_json_atomic",
]

FORMAT_VERSION = 1
SEQUENCE_PREFIX = "seq_"
TMP_PREFIX = ".tmp-"


def pose7_to_matrix(p) -> np.ndarray:
    """[x, y, z, qx, qy, qz, qw] (..., 7) -> (..., 4, 4)."""
    p = np.asarray(p, dtype=np.float64)
    x, y, z, w = p[..., 3], p[..., 4], p[..., 5], p[..., 6]
    n = np.sqrt(x * x + y * y + z * z + w * w)
    x, y, z, w = x / n, y / n, z / n, w / n
    T = np.zeros(p.shape[:-1] + (4, 4))
    T[..., 0, 0] = 1 - 2 * (y * y + z * z)
    T[..., 0, 1] = 2 * (x * y - z * w)
    T[..., 0, 2] = 2 * (x * z + y * w)
    T[..., 1, 0] = 2 * (x * y + z * w)
    T[..., 1, 1] = 1 - 2 * (x * x + z * z)
    T[..., 1, 2] = 2 * (y * z - x * w)
    T[..., 2, 0] = 2 * (x * z - y * w)
    T[..., 2, 1] = 2 * (y * z + x * w)
    T[..., 2, 2] = 1 - 2 * (x * x + y * y)
    T[..., :3, 3] = p[..., :3]
    T[..., 3, 3] = 1.0
    return T


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that ``path`` is either absent, the old file, or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class SyntheticFrame:
    """One frame with its ground truth; arrays are numpy, poses 4x4, SI units.

    Shapes: K keypoints, L links, n joints, N board corners.
    """

    sequence: str
    index: int
    stamp: float  # s
    stamp_ns: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray | None  # (H, W) uint8 labels (see meta["mask_labels"])
    K: np.ndarray  # (3, 3)
    dist: np.ndarray  # (5,) plumb_bob k1 k2 p1 p2 k3
    width: int
    height: int
    T_base_camera: np.ndarray  # (4, 4) camera optical frame in the base frame
    joints_true: np.ndarray  # (n,)
    joints_measured: np.ndarray  # (n,) what the joint sensors report (the node's input)
    joint_velocity: np.ndarray  # (n,) true velocity
    link_poses: np.ndarray  # (L, 4, 4) T_base_link, links in meta["link_names"] order
    keypoints_3d: np.ndarray  # (K, 3) base frame
    keypoints_2d: np.ndarray  # (K, 2) px, distorted image, NaN behind the camera
    keypoints_depth: np.ndarray  # (K,) z in the camera frame (m)
    keypoints_in_image: np.ndarray  # (K,) bool
    keypoints_visible: np.ndarray  # (K,) bool: in the image, on its own (or a jointed) link, not occluded
    ee_pose: np.ndarray  # (4, 4) T_base_ee
    ee_pose_camera: np.ndarray  # (4, 4) T_camera_ee
    board_pose_camera: np.ndarray  # (4, 4) T_camera_board
    board_visible: bool
    board_visible_fraction: float
    board_angle_deg: float  # between the board normal and the line of sight
    board_corners_2d: np.ndarray  # (N, 2) px, ChArUco corner ids 0..N-1
    board_corners_visible: np.ndarray  # (N,) bool
    blur_px: float  # motion-blur kernel length (0 = sharp)

    @property
    def T_camera_base(self) -> np.ndarray:
        return np.linalg.inv(self.T_base_camera)

    def camera_model(self):
        """The intrinsics as :class:`pose_estimator.geometry.CameraModel`."""
        from ..geometry import CameraModel

        return CameraModel(self.K, self.width, self.height, self.dist, "plumb_bob")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SyntheticSequence:
    """One sequence folder: fixed camera, continuous trajectory."""

    def __init__(self, path: Path, dataset: "SyntheticDataset"):
        self.path = Path(path)
        self.name = self.path.name
        self.dataset = dataset
        self.info: dict = json.loads((self.path / "sequence.json").read_text())
        cam = self.info["camera"]
        self.K = np.asarray(cam["K"], dtype=np.float64)
        self.dist = np.asarray(cam["dist"], dtype=np.float64)
        self.width, self.height = int(cam["width"]), int(cam["height"])
        self.T_base_camera = np.asarray(cam["T_base_camera"], dtype=np.float64)
        self.num_frames = int(self.info["num_frames"])
        self._records: list[dict] | None = None

    def __len__(self) -> int:
        return self.num_frames

    def __repr__(self) -> str:
        return f"SyntheticSequence({self.name!r}, frames={self.num_frames})"

    @property
    def bag_path(self) -> Path | None:
        p = self.path / "bag"
        return p if p.is_dir() else None

    def records(self) -> list[dict]:
        """The raw frames.jsonl objects (parsed on first use)."""
        if self._records is None:
            with open(self.path / "frames.jsonl") as f:
                self._records = [json.loads(line) for line in f if line.strip()]
        return self._records

    def joint_stream(self) -> dict[str, np.ndarray]:
        """The joint-state stream: stamp_ns (N,), position/velocity (true) and measured (N, n)."""
        rows = [json.loads(line) for line in open(self.path / "joints.jsonl") if line.strip()]
        return {
            "stamp_ns": np.array([r["stamp_ns"] for r in rows], dtype=np.int64),
            "position": np.array([r["position"] for r in rows], dtype=np.float64),
            "velocity": np.array([r["velocity"] for r in rows], dtype=np.float64),
            "measured": np.array([r["measured"] for r in rows], dtype=np.float64),
        }

    def frame(self, i: int, load_image: bool = True) -> SyntheticFrame:
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range for {self.name} ({self.num_frames} frames)")
        r = self.records()[i]
        image = mask = None
        if load_image:
            bgr = cv2.imread(str(self.path / r["image"]), cv2.IMREAD_COLOR)
            if bgr is None:
                raise OSError(f"cannot read {self.path / r['image']}")
            image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if r.get("mask"):
                mask = cv2.imread(str(self.path / r["mask"]), cv2.IMREAD_UNCHANGED)
        K = len(r["keypoints_visible"])
        uv = np.array([[np.nan, np.nan] if x is None else x for x in r["keypoints_2d"]], dtype=np.float64).reshape(K, 2)
        corners = np.array([[np.nan, np.nan] if x is None else x for x in r["board_corners_2d"]],
                           dtype=np.float64).reshape(-1, 2)
        return SyntheticFrame(
            sequence=self.name, index=int(r["index"]), stamp=float(r["stamp"]), stamp_ns=int(r["stamp_ns"]),
            image=image, mask=mask, K=self.K, dist=self.dist, width=self.width, height=self.height,
            T_base_camera=self.T_base_camera,
            joints_true=np.asarray(r["joints_true"], dtype=np.float64),
            joints_measured=np.asarray(r["joints_measured"], dtype=np.float64),
            joint_velocity=np.asarray(r["joint_velocity"], dtype=np.float64),
            link_poses=pose7_to_matrix(r["link_poses"]),
            keypoints_3d=np.asarray(r["keypoints_3d"], dtype=np.float64).reshape(K, 3),
            keypoints_2d=uv,
            keypoints_depth=np.asarray(r["keypoints_depth"], dtype=np.float64),
            keypoints_in_image=np.asarray(r["keypoints_in_image"], dtype=bool),
            keypoints_visible=np.asarray(r["keypoints_visible"], dtype=bool),
            ee_pose=pose7_to_matrix(r["ee_pose"]),
            ee_pose_camera=pose7_to_matrix(r["ee_pose_camera"]),
            board_pose_camera=pose7_to_matrix(r["board_pose_camera"]),
            board_visible=bool(r["board_visible"]),
            board_visible_fraction=float(r["board_visible_fraction"]),
            board_angle_deg=float(r["board_angle_deg"]),
            board_corners_2d=corners,
            board_corners_visible=np.asarray(r["board_corners_visible"], dtype=bool),
            blur_px=float(r["blur_px"]),
        )

    def __iter__(self) -> Iterator[SyntheticFrame]:
        for i in range(self.num_frames):
            yield self.frame(i)


class SyntheticDataset:
    """Lazy reader of a generated dataset: ``len``, ``ds[i]`` -> :class:`SyntheticFrame`, ``sequences()``.

    Only ``meta.json`` and each sequence's small ``sequence.json`` are read on
    construction; a sequence's frames.jsonl is parsed when one of its frames is
    first asked for (the last few stay cached), images when the frame is.
    A dataset still being written (no ``COMPLETE`` marker) raises unless
    ``require_complete=False``, in which case its finished sequences are read.
    """

    def __init__(self, root: str | os.PathLike, require_complete: bool = True, cache_sequences: int = 8):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a synthetic dataset (no meta.json)")
        self.meta: dict = json.loads(meta_path.read_text())
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {version} is not supported (this reader: {FORMAT_VERSION})")
        self.complete = (self.root / "COMPLETE").is_file()
        if require_complete and not self.complete:
            raise ValueError(f"{self.root} is incomplete (no COMPLETE marker): generation is running or was "
                             "interrupted; re-run generate to finish it, or pass require_complete=False")
        names = sorted(d.name for d in self.root.iterdir()
                       if d.is_dir() and d.name.startswith(SEQUENCE_PREFIX) and (d / "sequence.json").is_file())
        self._sequences = [SyntheticSequence(self.root / n, self) for n in names]
        self._offsets = np.cumsum([0] + [len(s) for s in self._sequences])
        self._cache: OrderedDict[int, None] = OrderedDict()
        self._cache_size = max(1, cache_sequences)

    # -------------------------------------------------------------- metadata
    @property
    def joint_names(self) -> list[str]:
        return list(self.meta["joint_names"])

    @property
    def keypoint_names(self) -> list[str]:
        return list(self.meta["keypoint_names"])

    @property
    def link_names(self) -> list[str]:
        return list(self.meta["link_names"])

    @property
    def T_ee_board(self) -> np.ndarray:
        """The board's pose in the end-effector frame (fixed, from meta.json)."""
        return np.asarray(self.meta["board"]["T_ee_board"], dtype=np.float64)

    def board_spec(self):
        from .config import BoardSpec, config_from_dict

        return config_from_dict(BoardSpec, self.meta["board"]["spec"], "meta.board.spec")

    # -------------------------------------------------------------- access
    def sequences(self) -> list[SyntheticSequence]:
        return list(self._sequences)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global frame index -> (sequence index, frame index)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"frame {i} out of range ({n} frames)")
        s = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return s, i - int(self._offsets[s])

    def __getitem__(self, i: int) -> SyntheticFrame:
        s, f = self.locate(int(i))
        self._touch(s)
        return self._sequences[s].frame(f)

    def _touch(self, s: int) -> None:
        self._cache.pop(s, None)
        self._cache[s] = None
        while len(self._cache) > self._cache_size:
            old, _ = self._cache.popitem(last=False)
            self._sequences[old]._records = None

    def __repr__(self) -> str:
        return (f"SyntheticDataset({str(self.root)!r}, sequences={len(self._sequences)}, frames={len(self)}, "
                f"robot={self.meta['robot']['name']!r})")
