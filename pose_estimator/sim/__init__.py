"""Synthetic world: rendered sequences of a sloppy arm with exact ground truth (FIG. 4, training data).

Any arm described by a URDF and a keypoint YAML, rendered with pybullet's CPU
tiny renderer; smooth joint trajectories; a measured-joint error model
(offset, backlash, noise); random cameras, lights, backgrounds, distractors,
occluders, lens distortion and motion blur; a ChArUco board on the hand. The
output is a versioned folder format (read with :class:`SyntheticDataset`) and
optionally a rosbag2 recording per sequence. See ``README.md`` beside this file.

Main entry points::

    from pose_estimator.sim import GeneratorConfig, generate_dataset, SyntheticDataset
    generate_dataset(GeneratorConfig(sequences=2, frames_per_sequence=30), "out/sim")
    ds = SyntheticDataset("out/sim"); frame = ds[0]; frame.image, frame.keypoints_2d
"""

from .board import BoardDetection, detect_board, make_board
from .cli import add_contact_sheet_arguments, add_generate_arguments, cli_contact_sheet, cli_generate
from .config import (BoardSpec, CameraConfig, GeneratorConfig, JointErrorModel, SceneConfig, TrajectoryConfig,
                     config_from_dict, config_to_dict)
from .contact_sheet import draw_frame, make_contact_sheet
from .dataset import FORMAT_VERSION, SyntheticDataset, SyntheticFrame, SyntheticSequence
from .joint_errors import JointErrors, apply_joint_errors, play_operator, sample_joint_errors
from .trajectory import Trajectory, sample_trajectory


def __getattr__(name: str):
    # The renderer (pybullet) loads only when something renders: reading datasets, training and
    # evaluation import this package on machines without it (a lent GPU's Python, say).
    if name in ("generate_dataset", "generate_sequence"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "GeneratorConfig",
    "JointErrorModel",
    "TrajectoryConfig",
    "CameraConfig",
    "SceneConfig",
    "BoardSpec",
    "config_from_dict",
    "config_to_dict",
    "generate_dataset",
    "generate_sequence",
    "SyntheticDataset",
    "SyntheticSequence",
    "SyntheticFrame",
    "JointErrors",
    "sample_joint_errors",
    "apply_joint_errors",
    "play_operator",
    "Trajectory",
    "sample_trajectory",
    "make_board",
    "detect_board",
    "BoardDetection",
    "draw_frame",
    "make_contact_sheet",
    "add_generate_arguments",
    "cli_generate",
    "add_contact_sheet_arguments",
    "cli_contact_sheet",
]
