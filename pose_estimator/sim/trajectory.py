"""Smooth joint trajectories: random waypoints joined by minimum-jerk segments.

Ground-truth interpolation and the displacement loss need sequences in which
the arm moves continuously, and backlash only shows when joints reverse, so a
trajectory is a chain of segments between random waypoints inside the joint
limits, with pauses and small back-and-forth moves mixed in. The trajectory is
a closed-form function of time: it can be sampled at the camera rate and at
the joint-state rate alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import TrajectoryConfig

__all__ = ["Trajectory", "sample_trajectory", "minimum_jerk"]


def minimum_jerk(tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-jerk profile s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5 on [0, 1] and ds/dtau."""
    tau = np.clip(tau, 0.0, 1.0)
    s = tau ** 3 * (10 + tau * (-15 + 6 * tau))
    ds = 30 * tau ** 2 * (1 - tau) ** 2
    return s, ds


@dataclass
class Trajectory:
    """Piecewise minimum-jerk joint trajectory.

    ``knots`` (M+1, n) are the segment end points, ``times`` (M+1,) the times
    (s, from 0) at which they are reached; between knots the joints follow
    :func:`minimum_jerk`, so velocity and acceleration are zero at every knot.
    """

    times: np.ndarray
    knots: np.ndarray

    @property
    def duration(self) -> float:
        return float(self.times[-1])

    def __call__(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions and velocities at times ``t`` (T,) -> ((T, n), (T, n)); clamped to [0, duration]."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, self.duration)
        seg = np.clip(np.searchsorted(self.times, t, side="right") - 1, 0, len(self.times) - 2)
        t0, t1 = self.times[seg], self.times[seg + 1]
        dt = t1 - t0
        s, ds = minimum_jerk((t - t0) / dt)
        a, b = self.knots[seg], self.knots[seg + 1]
        q = a + (b - a) * s[:, None]
        v = (b - a) * (ds / dt)[:, None]
        return q, v


def sample_trajectory(lower: np.ndarray, upper: np.ndarray, duration: float, cfg: TrajectoryConfig,
                      rng: np.random.Generator, revolute: np.ndarray | None = None) -> Trajectory:
    """A random trajectory of at least ``duration`` seconds inside [lower, upper] (n,) joint limits."""
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    n = lower.shape[0]
    if revolute is None:
        revolute = np.ones(n, dtype=bool)
    span = upper - lower
    lo, hi = lower + cfg.margin * span, upper - cfg.margin * span

    # Prismatic joints (grippers) move over metres, not radians: scale steps and speeds by their range.
    scale = np.where(revolute, 1.0, np.maximum(span, 1e-9) / math.pi)

    def waypoint(prev=None):
        if prev is None:
            return lo + (hi - lo) * rng.random(n)
        step = np.radians(cfg.step_deg) * scale
        return np.clip(prev + rng.uniform(-1.0, 1.0, n) * step, lo, hi)

    times, knots = [0.0], [waypoint()]

    def add(target, speed):
        delta = np.abs(target - knots[-1]) / scale
        # Peak speed of a minimum-jerk segment is 1.875 * distance / T.
        T = max(cfg.min_segment, 1.875 * float(delta.max()) / speed)
        times.append(times[-1] + T)
        knots.append(target)

    while times[-1] < duration:
        prev = knots[-1]
        target = waypoint(prev)
        add(target, rng.uniform(*cfg.speed))
        if rng.random() < cfg.reversal_probability:
            # Step back against the direction just travelled, then forward again: every moving
            # joint reverses twice, which is where backlash shows.
            amp = np.radians(rng.uniform(*cfg.reversal_deg, size=n)) * scale
            back = np.clip(target - np.sign(target - prev) * amp, lower, upper)
            add(back, rng.uniform(*cfg.speed) * 0.5)
            add(target, rng.uniform(*cfg.speed) * 0.5)
        if rng.random() < cfg.pause_probability:
            times.append(times[-1] + rng.uniform(*cfg.pause))
            knots.append(knots[-1].copy())
    return Trajectory(np.asarray(times), np.asarray(knots))
