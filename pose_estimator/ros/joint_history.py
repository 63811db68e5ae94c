"""A short history of joint states, read back at an image's stamp.

The camera and the arm driver are not synchronised: joint states arrive at
100–1000 Hz, images at 30 Hz, with their own stamps. The kinematic seed and
prior of a frame must be the joints *when the image was taken*, so the node
keeps the last ``history_s`` seconds of joint states and interpolates linearly
between the two samples around each image stamp (FIG. 3: "joint-state
kinematics at the image time").

Rules (each a decision a user may look for):

* Samples are mapped to the robot's joint order by name. Names the URDF does
  not know are ignored when the message also carries known joints (a gripper
  or a second device on the same topic); a message with *no* known joint is
  refused. Joints a message leaves out keep their last value (drivers that
  publish the arm and the gripper separately).
* A message with NaN/inf in a joint the robot uses, or with fewer positions
  than names, is refused (``ValueError`` with the reason): a hole is better
  than a wrong value, and a run of refused messages shows up as staleness.
* A stamp more than ``jump_back_s`` older than the newest sample means time
  went backwards (a recording looped, a simulator restarted): the history is
  cleared and :meth:`JointHistory.add` returns ``True`` so the caller can reset
  whatever else depends on time. Smaller reorderings are inserted in order.
* Outside the buffered interval the nearest sample is held, never
  extrapolated; the distance to it is the lookup's ``age_s``, and a lookup
  farther than ``max_age_s`` from any sample is ``stale``.

No ROS imports: stamps are integer nanoseconds.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["JointHistory", "JointLookup"]


@dataclass
class JointLookup:
    """Joints at one stamp. ``positions`` is in the history's joint order (NaN where never received)."""

    positions: np.ndarray
    #: seconds from the stamp to the nearest sample used (0 when bracketed by samples)
    age_s: float
    #: ``age_s`` exceeds the history's ``max_age_s``
    stale: bool
    #: 'interpolated', 'exact', 'held_newest' (stamp after the newest sample) or 'held_oldest'
    source: str
    #: joints that no message has carried yet
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


class JointHistory:
    """Time-ordered joint vectors for interpolation at image stamps (see the module docstring)."""

    def __init__(self, joint_names: Sequence[str], history_s: float = 2.0, max_age_s: float = 0.25,
                 jump_back_s: float = 0.25, max_samples: int = 4096):
        if history_s <= 0 or max_age_s <= 0 or jump_back_s < 0 or max_samples < 2:
            raise ValueError("history_s and max_age_s must be > 0, jump_back_s >= 0, max_samples >= 2")
        self.joint_names = list(joint_names)
        self._index = {n: i for i, n in enumerate(self.joint_names)}
        self.history_ns = int(history_s * 1e9)
        self.max_age_s = float(max_age_s)
        self.jump_back_ns = int(jump_back_s * 1e9)
        self.max_samples = int(max_samples)
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        """Forget every sample (the last-known values of absent joints too)."""
        self._stamps: list[int] = []
        self._rows: list[np.ndarray] = []
        self._latest = np.full(len(self.joint_names), np.nan)

    def __len__(self) -> int:
        return len(self._stamps)

    @property
    def newest_stamp_ns(self) -> int | None:
        return self._stamps[-1] if self._stamps else None

    def add(self, stamp_ns: int, names: Sequence[str], positions: Sequence[float]) -> bool:
        """Add one ``sensor_msgs/JointState`` sample; returns True if time jumped back and the history was reset.

        Raises:
            ValueError: the sample is refused (no known joint, length mismatch,
                NaN/inf in a known joint); the history is unchanged.
        """
        names = list(names)
        pos = np.asarray(positions, dtype=np.float64).reshape(-1)
        if len(pos) < len(names):
            raise ValueError(f"joint state has {len(names)} names but {len(pos)} positions")
        cols = [(self._index[n], k) for k, n in enumerate(names) if n in self._index]
        if not cols:
            raise ValueError(f"none of the joint names {names[:6]}{'...' if len(names) > 6 else ''} "
                             f"is in the robot model (expected {self.joint_names})")
        bad = [names[k] for _, k in cols if not math.isfinite(pos[k])]
        if bad:
            raise ValueError(f"joint state has non-finite positions for {bad}")
        stamp_ns = int(stamp_ns)
        jumped = False
        if self._stamps and stamp_ns < self._stamps[-1] - self.jump_back_ns:
            self.reset()
            self.resets += 1
            jumped = True
        # Joints this message does not carry keep their last value.
        row = self._latest.copy()
        for j, k in cols:
            row[j] = pos[k]
        if not self._stamps or stamp_ns > self._stamps[-1]:
            self._latest = row
            self._stamps.append(stamp_ns)
            self._rows.append(row)
        else:
            i = bisect.bisect_left(self._stamps, stamp_ns)
            if i < len(self._stamps) and self._stamps[i] == stamp_ns:
                # Same stamp (e.g. arm and gripper messages): merge into that sample.
                merged = self._rows[i].copy()
                for j, k in cols:
                    merged[j] = pos[k]
                self._rows[i] = merged
                if i == len(self._stamps) - 1:
                    self._latest = merged
            else:
                self._stamps.insert(i, stamp_ns)
                self._rows.insert(i, row)
        self._trim()
        return jumped

    def _trim(self) -> None:
        cutoff = self._stamps[-1] - self.history_ns
        n_old = bisect.bisect_left(self._stamps, cutoff)
        n_old = max(n_old, len(self._stamps) - self.max_samples)
        # Keep one sample older than the window so a stamp just inside it is still bracketed.
        n_old = min(max(n_old - 1, 0), len(self._stamps) - 1)
        if n_old > 0:
            del self._stamps[:n_old]
            del self._rows[:n_old]

    def lookup(self, stamp_ns: int) -> JointLookup | None:
        """Joints at ``stamp_ns`` (None when the history is empty)."""
        if not self._stamps:
            return None
        stamp_ns = int(stamp_ns)
        s = self._stamps
        i = bisect.bisect_left(s, stamp_ns)
        if i < len(s) and s[i] == stamp_ns:
            q, age, source = self._rows[i].copy(), 0.0, "exact"
        elif i == 0:
            q, age, source = self._rows[0].copy(), (s[0] - stamp_ns) * 1e-9, "held_oldest"
        elif i == len(s):
            q, age, source = self._rows[-1].copy(), (stamp_ns - s[-1]) * 1e-9, "held_newest"
        else:
            t0, t1 = s[i - 1], s[i]
            w = (stamp_ns - t0) / (t1 - t0)
            q = (1 - w) * self._rows[i - 1] + w * self._rows[i]
            # A gap in the stream counts as age: the middle of a 1 s hole is 0.5 s from any data.
            age, source = min(stamp_ns - t0, t1 - stamp_ns) * 1e-9, "interpolated"
        missing = [self.joint_names[j] for j in np.flatnonzero(~np.isfinite(q))]
        return JointLookup(positions=q, age_s=float(age), stale=age > self.max_age_s, source=source,
                           missing=missing)
