"""rosbag2 recordings of a synthetic sequence, written with ``rosbags`` (no ROS install needed).

What a camera-and-arm rig would record, plus the ground truth on topics of
its own (the node never subscribes to those):

=============================  ==========================  ==========================================
topic                          type                        rate / content
=============================  ==========================  ==========================================
``/camera/image_raw``          sensor_msgs/Image (rgb8)    camera rate, frame ``camera_optical_frame``
``/camera/camera_info``        sensor_msgs/CameraInfo      camera rate, same stamps as the images
``/joint_states``              sensor_msgs/JointState      joint rate, the *measured* joints
``/tf_static``                 tf2_msgs/TFMessage          once: base_link -> camera_optical_frame
``/robot_description``         std_msgs/String             once: the URDF XML
``/ground_truth/joint_states`` sensor_msgs/JointState      joint rate, true positions and velocities
``/ground_truth/ee_pose``      geometry_msgs/PoseStamped   camera rate, end effector in the camera frame
``/ground_truth/board_pose``   geometry_msgs/PoseStamped   camera rate, board in the camera frame
=============================  ==========================  ==========================================

Every header stamp equals the message's log time; image stamps are joint-state
stamps too (the joint rate is a multiple of the camera rate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["BagRecorder", "TOPICS", "typestore"]

TOPICS = {
    "image": ("/camera/image_raw", "sensor_msgs/msg/Image"),
    "camera_info": ("/camera/camera_info", "sensor_msgs/msg/CameraInfo"),
    "joint_states": ("/joint_states", "sensor_msgs/msg/JointState"),
    "tf_static": ("/tf_static", "tf2_msgs/msg/TFMessage"),
    "robot_description": ("/robot_description", "std_msgs/msg/String"),
    "gt_joint_states": ("/ground_truth/joint_states", "sensor_msgs/msg/JointState"),
    "gt_ee_pose": ("/ground_truth/ee_pose", "geometry_msgs/msg/PoseStamped"),
    "gt_board_pose": ("/ground_truth/board_pose", "geometry_msgs/msg/PoseStamped"),
}


def typestore():
    """The newest ROS 2 message store rosbags knows (these message definitions are the same from Humble on)."""
    from rosbags.typesys import Stores, get_typestore

    for name in ("ROS2_KILTED", "ROS2_JAZZY", "ROS2_HUMBLE"):
        if hasattr(Stores, name):
            return get_typestore(getattr(Stores, name))
    return get_typestore(Stores.LATEST)


def _latched_qos():
    """Transient-local, reliable, keep-last-1: what /tf_static and /robot_description are offered with."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return [Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE, QosDurability.TRANSIENT_LOCAL,
                zero, zero, QosLiveliness.AUTOMATIC, zero, False)]


class BagRecorder:
    """Writes one sequence's messages into a rosbag2 directory at ``path`` (which must not exist)."""

    def __init__(self, path: str | Path, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.ts = typestore()
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self.writer = Writer(Path(path), version=8, storage_plugin=plugin)
        self.writer.open()
        self.conn = {}
        latched = {"tf_static", "robot_description"}
        for key, (topic, msgtype) in TOPICS.items():
            kwargs = {"offered_qos_profiles": _latched_qos()} if key in latched else {}
            self.conn[key] = self.writer.add_connection(topic, msgtype, typestore=self.ts, **kwargs)
        t = self.ts.types
        self._Header, self._Time = t["std_msgs/msg/Header"], t["builtin_interfaces/msg/Time"]

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "BagRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers
    def _header(self, stamp_ns: int, frame_id: str):
        return self._Header(stamp=self._Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)),
                            frame_id=frame_id)

    def _write(self, key: str, stamp_ns: int, msg) -> None:
        _, msgtype = TOPICS[key]
        self.writer.write(self.conn[key], int(stamp_ns), self.ts.serialize_cdr(msg, msgtype))

    def _pose(self, T: np.ndarray):
        from .scene import matrix_to_pose7

        x, y, z, qx, qy, qz, qw = matrix_to_pose7(T)
        t = self.ts.types
        return t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=x, y=y, z=z),
                                           orientation=t["geometry_msgs/msg/Quaternion"](x=qx, y=qy, z=qz, w=qw))

    # --------------------------------------------------------------- messages
    def write_static(self, stamp_ns: int, parent: str, child: str, T_parent_child: np.ndarray, urdf_xml: str) -> None:
        """/tf_static (parent -> child, i.e. the child's pose in the parent) and /robot_description."""
        t = self.ts.types
        pose = self._pose(T_parent_child)
        tf = t["geometry_msgs/msg/TransformStamped"](
            header=self._header(stamp_ns, parent), child_frame_id=child,
            transform=t["geometry_msgs/msg/Transform"](
                translation=t["geometry_msgs/msg/Vector3"](x=pose.position.x, y=pose.position.y, z=pose.position.z),
                rotation=pose.orientation))
        self._write("tf_static", stamp_ns, t["tf2_msgs/msg/TFMessage"](transforms=[tf]))
        self._write("robot_description", stamp_ns, t["std_msgs/msg/String"](data=urdf_xml))

    def write_joint_state(self, stamp_ns: int, names: list[str], position: np.ndarray,
                          velocity: np.ndarray | None = None, ground_truth: bool = False) -> None:
        msg = self.ts.types["sensor_msgs/msg/JointState"](
            header=self._header(stamp_ns, ""), name=list(names),
            position=np.asarray(position, dtype=np.float64),
            velocity=np.asarray(velocity if velocity is not None else [], dtype=np.float64),
            effort=np.zeros(0, dtype=np.float64))
        self._write("gt_joint_states" if ground_truth else "joint_states", stamp_ns, msg)

    def write_image(self, stamp_ns: int, frame_id: str, rgb: np.ndarray, K: np.ndarray, dist: np.ndarray) -> None:
        """/camera/image_raw (rgb8) and its /camera/camera_info, same stamp."""
        t = self.ts.types
        h, w = rgb.shape[:2]
        img = t["sensor_msgs/msg/Image"](header=self._header(stamp_ns, frame_id), height=h, width=w, encoding="rgb8",
                                         is_bigendian=0, step=3 * w,
                                         data=np.ascontiguousarray(rgb, dtype=np.uint8).reshape(-1))
        P = np.zeros((3, 4))
        P[:3, :3] = K
        info = t["sensor_msgs/msg/CameraInfo"](
            header=self._header(stamp_ns, frame_id), height=h, width=w, distortion_model="plumb_bob",
            d=np.asarray(dist, dtype=np.float64), k=np.asarray(K, dtype=np.float64).reshape(-1),
            r=np.eye(3).reshape(-1), p=P.reshape(-1), binning_x=0, binning_y=0,
            roi=t["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))
        self._write("image", stamp_ns, img)
        self._write("camera_info", stamp_ns, info)

    def write_pose(self, key: str, stamp_ns: int, frame_id: str, T: np.ndarray) -> None:
        """A ground-truth PoseStamped (``key`` = 'gt_ee_pose' or 'gt_board_pose')."""
        msg = self.ts.types["geometry_msgs/msg/PoseStamped"](header=self._header(stamp_ns, frame_id),
                                                             pose=self._pose(T))
        self._write(key, stamp_ns, msg)
