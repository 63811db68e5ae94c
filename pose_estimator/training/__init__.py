"""Training and evaluation of HeatmapNet (ROS-free): ``pose-estimator train`` and ``pose-estimator evaluate``."""

from .data import AugmentConfig, TrainingData
from .train import LossWeights, TrainConfig, load_checkpoint, train

__all__ = ["AugmentConfig", "TrainingData", "LossWeights", "TrainConfig", "train", "load_checkpoint"]
