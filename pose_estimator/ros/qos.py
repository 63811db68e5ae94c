"""The QoS profiles the node and the player use, chosen once here (REP-2003 conventions).

* Sensor streams (images, camera info, joint states): best effort, keep last
  ``depth``, volatile -- the newest sample matters, a lost one is not resent.
  A best-effort subscription also matches reliable publishers.
* Latched data (``/robot_description``, ``/tf_static``): reliable, transient
  local, keep last 1 -- a late subscriber still gets it.
* ``/tf``: reliable, keep last 100, volatile (what ``tf2_ros`` uses).
* Outputs (pose, keypoints, status, debug image): reliable, keep last 10.
"""

from __future__ import annotations

from rclpy.qos import (QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy)

__all__ = ["sensor_qos", "latched_qos", "tf_qos", "tf_static_qos", "output_qos"]


def sensor_qos(depth: int = 5) -> QoSProfile:
    """``qos_profile_sensor_data`` with a chosen depth."""
    return QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=QoSReliabilityPolicy.BEST_EFFORT, durability=QoSDurabilityPolicy.VOLATILE)


def latched_qos(depth: int = 1) -> QoSProfile:
    return QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)


def tf_qos() -> QoSProfile:
    return QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=100,
                      reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.VOLATILE)


def tf_static_qos(depth: int = 1) -> QoSProfile:
    """Publisher side depth 1 (one accumulated message); listeners use a larger depth."""
    return latched_qos(depth)


def output_qos(depth: int = 10) -> QoSProfile:
    return QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=QoSReliabilityPolicy.RELIABLE, durability=QoSDurabilityPolicy.VOLATILE)
