"""Configuration dataclasses and their YAML loading: one source of defaults.

The CLI, training and the ROS node all build an :class:`EstimatorConfig`
from the same YAML (``config/estimator.yaml`` holds the defaults, the node's
``config/pose_estimator.yaml`` nests the same keys under ``ros__parameters``),
so a default is changed in one place: the dataclass field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .solver import SolverConfig

__all__ = ["EstimatorConfig", "from_dict", "to_dict", "load_config"]

T = TypeVar("T")


@dataclass
class EstimatorConfig:
    """Everything :class:`~pose_estimator.estimator.Estimator` needs besides the model file
    (which brings the architecture and how the network looks at the image)."""

    #: robot definition: a name under resource/robots/ or a path to a keypoint YAML
    robot: str = "panda"
    #: 'articulated' (camera-from-base + joint corrections) or 'rigid' (end-effector body only)
    mode: str = "articulated"
    #: 'softargmax' or 'gaussian_fit' (the peak may lie outside the image)
    keypoint_method: str = "softargmax"
    #: spatial-softmax temperature
    temperature: float = 1.0
    #: 'kinematic': crop around where the measured joints put the arm; 'full': whole frame
    roi: str = "kinematic"
    #: margin added around the kinematic bounding box, as a fraction of its size
    roi_margin: float = 0.25
    #: with a model trained for it (its file names a ``refine_margin``), look again at the end effector
    #: in a second, closer crop and combine the keypoints inside it with the first crop's (each weighted
    #: by its inverse covariance); false: one crop only
    refine_end_effector: bool = True
    #: run the two crops' networks at the same time, the second in a helper thread with the caller's torch
    #: thread count (on a small CPU two single-threaded networks side by side beat one after the other,
    #: each with every core); false: one after the other
    parallel_crops: bool = True
    #: joint prior standard deviation (rad), articulated mode; the model file's joint_prior_scale
    #: (fitted by `pose-estimator calibrate`) multiplies it
    joint_sigma: float = 0.02
    #: the same for prismatic joints (m); the same factor multiplies it
    joint_sigma_m: float = 0.02
    #: keep the camera-from-base estimate between frames as the next seed (static camera)
    track_camera: bool = True
    #: a frame whose published position uncertainty (largest 1-sigma) is more than this many times that of
    #: the frame the tracked camera-from-base came from does not replace it (one frame lost in the image,
    #: metres off with metres of uncertainty, does not seed the next ones); <= 0: every converged frame does
    track_max_sigma_ratio: float = 3.0
    #: std (m, rad) of the prior holding camera_from_base to its seed; <= 0 disables the prior
    camera_prior_sigma_m: float = 0.05
    camera_prior_sigma_rad: float = 0.05
    #: minimum keypoint confidence to be used by the solver
    min_confidence: float = 0.0
    #: multiplies every keypoint covariance the heat maps report: a calibration of the network's
    #: variance against its actual error on held-out data (1 = trust the heat maps as they are)
    keypoint_variance_scale: float = 1.0
    solver: SolverConfig = field(default_factory=SolverConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("rigid", "articulated"):
            raise ValueError(f"mode must be 'rigid' or 'articulated', got '{self.mode}'")
        if self.keypoint_method not in ("softargmax", "gaussian_fit"):
            raise ValueError(f"keypoint_method must be 'softargmax' or 'gaussian_fit', got '{self.keypoint_method}'")
        if self.roi not in ("kinematic", "full"):
            raise ValueError(f"roi must be 'kinematic' or 'full', got '{self.roi}'")
        if (self.temperature <= 0 or self.joint_sigma <= 0 or self.joint_sigma_m <= 0
                or self.keypoint_variance_scale <= 0):
            raise ValueError("temperature, joint_sigma, joint_sigma_m and keypoint_variance_scale must be > 0")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclasses.

    Unknown keys raise ``ValueError`` naming them (a typo must not silently
    fall back to a default).
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = from_dict(type(default), value, f"{where}.{name}")
        else:
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            if default is not dataclasses.MISSING and default is not None and not isinstance(value, type(default)):
                if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
                else:
                    raise ValueError(f"{where}.{name}: expected {type(default).__name__}, got {value!r}")
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> EstimatorConfig:
    """Read an :class:`EstimatorConfig` from YAML (missing keys take the defaults).

    Accepts a plain mapping or a ROS 2 parameter file (``<node>: ros__parameters: {...}``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if isinstance(raw, dict) and len(raw) == 1:
            (only,) = raw.values()
            if isinstance(only, dict) and "ros__parameters" in only:
                raw = only["ros__parameters"].get("estimator", {})
        data = raw
    if overrides:
        data = _merge(data, overrides)
    return from_dict(EstimatorConfig, data, str(path or "config"))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
