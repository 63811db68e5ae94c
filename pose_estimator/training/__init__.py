"""Training and evaluation of HeatmapNet (ROS-free): ``pose-estimator train``, ``evaluate``, ``calibrate``,
and ``pack`` (datasets made small enough to train on another machine, see :mod:`.packed`)."""

from .data import AugmentConfig, TrainingData
from .train import LossWeights, TrainConfig, load_checkpoint, train

__all__ = ["AugmentConfig", "TrainingData", "LossWeights", "TrainConfig", "train", "load_checkpoint"]
