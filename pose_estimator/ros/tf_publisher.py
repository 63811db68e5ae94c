"""TF in and out, with ``tf2_ros`` where it is installed and plain ``tf2_msgs`` where it is not.

Sending: :class:`TransformSender` wraps ``tf2_ros.TransformBroadcaster``
(``StaticTransformBroadcaster`` for static ones); without tf2_ros it publishes
``tf2_msgs/TFMessage`` on ``/tf`` (reliable, depth 100) or ``/tf_static``
(transient local, all static transforms accumulated in one message) -- the
same topics, types and QoS tf2_ros uses, so rviz and every TF listener see no
difference.

Receiving: :class:`StaticTransformCache` keeps the ``/tf_static`` tree and
answers ``lookup(target, source)`` by chaining edges (e.g. the calibrated
``base_link -> camera_optical_frame`` the node may use as its extrinsic).
Only static transforms: the camera extrinsic is fixed by assumption, and a
moving camera is exactly what the estimator tracks.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable

import numpy as np
import torch

from ..geometry import matrix_from_quaternion, quaternion_from_matrix
from .qos import latched_qos, tf_qos, tf_static_qos

__all__ = ["transform_msg", "matrix_from_transform", "TransformSender", "StaticTransformCache",
           "tf2_ros_available"]


def tf2_ros_available() -> bool:
    try:
        import tf2_ros  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


def transform_msg(T: np.ndarray, parent: str, child: str, stamp):
    """A ``geometry_msgs/TransformStamped``: ``T`` (4x4) is the child's pose in ``parent`` (T_parent_child)."""
    from geometry_msgs.msg import TransformStamped

    T = np.asarray(T, dtype=np.float64)
    q = quaternion_from_matrix(torch.as_tensor(T[:3, :3])).numpy()
    m = TransformStamped()
    m.header.stamp = stamp
    m.header.frame_id = parent
    m.child_frame_id = child
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = (float(v) for v in T[:3, 3])
    m.transform.rotation.x, m.transform.rotation.y, m.transform.rotation.z, m.transform.rotation.w = (
        float(v) for v in q)
    return m


def matrix_from_transform(tf) -> np.ndarray:
    """``geometry_msgs/Transform`` -> 4x4 (T_parent_child)."""
    r, t = tf.rotation, tf.translation
    T = np.eye(4)
    T[:3, :3] = matrix_from_quaternion(torch.tensor([r.x, r.y, r.z, r.w], dtype=torch.float64)).numpy()
    T[:3, 3] = (t.x, t.y, t.z)
    return T


class TransformSender:
    """Broadcasts transforms on /tf (or /tf_static when ``static``); see the module docstring."""

    def __init__(self, node, static: bool = False):
        self.static = static
        self._static_msgs: dict[str, object] = {}
        try:
            import tf2_ros

            self._br = tf2_ros.StaticTransformBroadcaster(node) if static else tf2_ros.TransformBroadcaster(node)
            self.backend = "tf2_ros"
        except ImportError:
            from tf2_msgs.msg import TFMessage

            self._br = None
            self._TFMessage = TFMessage
            self._pub = node.create_publisher(TFMessage, "/tf_static" if static else "/tf",
                                              tf_static_qos() if static else tf_qos())
            self.backend = "tf2_msgs"

    def send(self, transforms: Iterable) -> None:
        transforms = list(transforms)
        if not transforms:
            return
        if self._br is not None:
            self._br.sendTransform(transforms)
            return
        if self.static:
            # Like tf2_ros: one latched message holding every static transform sent so far.
            for t in transforms:
                self._static_msgs[t.child_frame_id] = t
            transforms = list(self._static_msgs.values())
        self._pub.publish(self._TFMessage(transforms=transforms))

    @property
    def publisher(self):
        """The underlying publisher (None with tf2_ros)."""
        return getattr(self, "_pub", None)


class StaticTransformCache:
    """The ``/tf_static`` tree of the ROS graph, for looking up fixed transforms."""

    def __init__(self, node, topic: str = "/tf_static"):
        from tf2_msgs.msg import TFMessage

        self._lock = threading.Lock()
        # child -> (parent, T_parent_child)
        self._edges: dict[str, tuple[str, np.ndarray]] = {}
        self.subscription = node.create_subscription(TFMessage, topic, self._on_tf, latched_qos(depth=100))

    def _on_tf(self, msg) -> None:
        with self._lock:
            for t in msg.transforms:
                if t.child_frame_id and t.header.frame_id:
                    self._edges[t.child_frame_id.lstrip("/")] = (t.header.frame_id.lstrip("/"),
                                                                 matrix_from_transform(t.transform))

    def add(self, parent: str, child: str, T_parent_child: np.ndarray) -> None:
        """Insert an edge by hand (tests, or a calibration given as a parameter)."""
        with self._lock:
            self._edges[child] = (parent, np.asarray(T_parent_child, dtype=np.float64))

    def frames(self) -> set[str]:
        with self._lock:
            return set(self._edges) | {p for p, _ in self._edges.values()}

    def lookup(self, target: str, source: str) -> np.ndarray | None:
        """T_target_source (maps points in ``source`` to ``target``), or None when not connected."""
        target, source = target.lstrip("/"), source.lstrip("/")
        if target == source:
            return np.eye(4)
        with self._lock:
            edges = dict(self._edges)
        # Breadth-first over the undirected tree; each step carries T_source_node.
        adj: dict[str, list[tuple[str, np.ndarray]]] = {}
        for child, (parent, T_pc) in edges.items():
            adj.setdefault(parent, []).append((child, T_pc))  # from parent to child: T_parent_child
            adj.setdefault(child, []).append((parent, np.linalg.inv(T_pc)))
        seen = {source}
        queue = deque([(source, np.eye(4))])  # (frame f, T_source_f)
        while queue:
            frame, T_sf = queue.popleft()
            for nxt, T_fn in adj.get(frame, []):
                if nxt in seen:
                    continue
                T_sn = T_sf @ T_fn
                if nxt == target:
                    return np.linalg.inv(T_sn)  # T_target_source
                seen.add(nxt)
                queue.append((nxt, T_sn))
        return None
