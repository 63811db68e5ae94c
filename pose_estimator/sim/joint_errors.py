"""The joint error model: how a cheap arm's joint sensors lie (FIG. 3, "measured joints").

A realised model (:class:`JointErrors`) holds one arm's per-joint offset and
backlash width plus the noise level; :func:`apply_joint_errors` turns a true
joint trajectory sampled at the joint-state rate into the measured one. The
backlash is the classic play operator, so it has memory: the measured value
depends on the direction the joint last moved in, not on its current velocity
alone, and it is only defined on a sampled time series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import JointErrorModel

__all__ = ["JointErrors", "sample_joint_errors", "play_operator", "apply_joint_errors"]


@dataclass
class JointErrors:
    """One arm's realised joint errors, per joint (rad or m), in the dataset's joint order."""

    offset: np.ndarray  # (n,) constant encoder offset
    backlash: np.ndarray  # (n,) play width b
    noise_std: np.ndarray  # (n,) white noise std per sample
    initial_play: np.ndarray  # (n,) measured - true at t=0 from backlash, in [-b/2, b/2]

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("offset", "backlash", "noise_std", "initial_play")}

    @classmethod
    def from_dict(cls, d: dict) -> "JointErrors":
        keys = ("offset", "backlash", "noise_std", "initial_play")
        return cls(**{k: np.asarray(d[k], dtype=np.float64) for k in keys})


def sample_joint_errors(model: JointErrorModel, revolute: np.ndarray, rng: np.random.Generator) -> JointErrors:
    """Draw one arm's errors. ``revolute`` (n,) bool: True for revolute, False for prismatic joints."""
    revolute = np.asarray(revolute, dtype=bool)
    n = revolute.shape[0]
    d2r = math.pi / 180.0
    off_std = np.where(revolute, model.offset_std_deg * d2r, model.offset_std_m)
    b_lo = np.where(revolute, model.backlash_deg[0] * d2r, model.backlash_m[0])
    b_hi = np.where(revolute, model.backlash_deg[1] * d2r, model.backlash_m[1])
    noise = np.where(revolute, model.noise_std_deg * d2r, model.noise_std_m)
    offset = rng.standard_normal(n) * off_std
    backlash = b_lo + (b_hi - b_lo) * rng.random(n)
    initial = (rng.random(n) - 0.5) * backlash
    return JointErrors(offset, backlash, noise.astype(np.float64), initial)


def play_operator(x: np.ndarray, width: np.ndarray, initial: np.ndarray | None = None) -> np.ndarray:
    """Backlash (play) hysteresis along axis 0: x (N, n) -> y (N, n).

    ``y_i = clip(y_{i-1}, x_i - b/2, x_i + b/2)``: while x rises, y = x - b/2;
    while it falls, y = x + b/2; after a reversal y holds until x has moved b.
    ``initial`` (n,) is y_0 - x_0 (default 0).
    """
    x = np.asarray(x, dtype=np.float64)
    half = np.asarray(width, dtype=np.float64) / 2
    y = np.empty_like(x)
    prev = x[0] + (0.0 if initial is None else np.clip(initial, -half, half))
    for i in range(x.shape[0]):
        prev = np.minimum(np.maximum(prev, x[i] - half), x[i] + half)
        y[i] = prev
    return y


def apply_joint_errors(q_true: np.ndarray, errors: JointErrors, rng: np.random.Generator) -> np.ndarray:
    """Measured joints for a true trajectory sampled at the joint rate: (N, n) -> (N, n).

    measured = play(true; backlash) + offset + N(0, noise_std).
    """
    q_true = np.asarray(q_true, dtype=np.float64)
    lagged = play_operator(q_true, errors.backlash, errors.initial_play)
    return lagged + errors.offset + rng.standard_normal(q_true.shape) * errors.noise_std
