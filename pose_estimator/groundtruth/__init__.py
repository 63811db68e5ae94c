"""Self-labelling ground truth (FIG. 5): fiducial poses where the board is seen, kinematic interpolation elsewhere.

ROS-free. See ``README.md`` beside this file::

    python -m pose_estimator.groundtruth label DATASET --json
    python -m pose_estimator.groundtruth plot-labels DATASET --sequence 0 --out labels.png
"""

from .cli import add_cli_commands, add_label_arguments, add_plot_arguments, cli_label, cli_plot
from .coco import load_coco_keypoints, write_coco_keypoints
from .fiducial import FiducialGate, FiducialMeasurement, measure_fiducial, pose_error, pose_perturb, sharpness
from .interpolate import (InterpolationConfig, fit_camera_base, interpolate_sequence, kalman_filter,
                          rts_smoother)
from .labels import LabelConfig, label_dataset, label_sequence

__all__ = [
    "add_cli_commands",
    "add_label_arguments",
    "cli_label",
    "add_plot_arguments",
    "cli_plot",
    "load_coco_keypoints",
    "write_coco_keypoints",
    "FiducialGate",
    "FiducialMeasurement",
    "measure_fiducial",
    "pose_error",
    "pose_perturb",
    "sharpness",
    "InterpolationConfig",
    "kalman_filter",
    "rts_smoother",
    "fit_camera_base",
    "interpolate_sequence",
    "LabelConfig",
    "label_sequence",
    "label_dataset",
]
