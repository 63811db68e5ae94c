"""Run-time statistics of the node and their ``diagnostic_msgs`` form.

:class:`WindowStats` keeps (time, value) samples of the last ``window_s``
seconds and answers rate and percentiles; :class:`Counters` holds the totals
the node reports. :func:`diagnostic_status` turns them into a
``diagnostic_msgs/DiagnosticStatus`` whose key-value fields (plain numbers,
stable keys) can be plotted with rqt_plot / PlotJuggler.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["WindowStats", "Counters", "diagnostic_status", "OK", "WARN", "ERROR", "STALE"]

# diagnostic_msgs/DiagnosticStatus levels (bytes in the message).
OK, WARN, ERROR, STALE = 0, 1, 2, 3


class WindowStats:
    """Samples of the last ``window_s`` seconds (monotonic clock): rate and percentiles."""

    def __init__(self, window_s: float = 5.0, max_samples: int = 10_000):
        self.window_s = float(window_s)
        self._d: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, value: float = 0.0, now: float | None = None) -> None:
        with self._lock:
            self._d.append((time.monotonic() if now is None else now, float(value)))

    def _recent(self, now: float | None) -> list[tuple[float, float]]:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._d and self._d[0][0] < now - self.window_s:
                self._d.popleft()
            return list(self._d)

    def rate(self, now: float | None = None) -> float:
        """Samples per second over the window (0 with fewer than two samples)."""
        d = self._recent(now)
        if len(d) < 2:
            return 0.0
        span = d[-1][0] - d[0][0]
        return (len(d) - 1) / span if span > 0 else 0.0

    def percentile(self, q: float, now: float | None = None) -> float:
        d = self._recent(now)
        return float(np.percentile([v for _, v in d], q)) if d else float("nan")

    def count(self, now: float | None = None) -> int:
        return len(self._recent(now))


@dataclass
class Counters:
    """Totals since start (reported as diagnostics key-values)."""

    frames_received: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0  # replaced by a newer frame before the worker took them
    poses_published: int = 0
    poses_rejected: int = 0  # processed, but no pose (solver refused, residual too large, ...)
    bad_images: int = 0
    bad_camera_info: int = 0
    bad_joint_states: int = 0
    stale_joint_frames: int = 0
    time_jumps: int = 0
    internal_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return str(v)


def diagnostic_status(name: str, hardware_id: str, level: int, message: str, values: dict):
    """A ``diagnostic_msgs/DiagnosticStatus`` with ``values`` as key-value pairs (in the given order)."""
    from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

    st = DiagnosticStatus()
    st.level = bytes([int(level)])
    st.name = name
    st.hardware_id = hardware_id
    st.message = message
    st.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    return st
