"""Start the pose_estimator node beside a camera driver and an arm driver.

    ros2 launch pose_estimator pose_estimator.launch.py \
        image:=/camera/image_raw camera_info:=/camera/camera_info joint_states:=/joint_states \
        model_path:=/path/to/model.safetensors

Parameters come from ``config/pose_estimator.yaml`` (``params_file:=`` for your
own); the arguments below override the few that people change. An argument
left empty leaves the parameter file's value alone.
Works with ROS 2 Humble, Jazzy and Kilted.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# (name, default, description)
ARGUMENTS = [
    ("image", "/camera/image_raw", "sensor_msgs/Image topic (the compressed one is <image>/compressed)"),
    ("camera_info", "/camera/camera_info", "sensor_msgs/CameraInfo topic"),
    ("joint_states", "/joint_states", "sensor_msgs/JointState topic"),
    ("robot_description", "/robot_description", "std_msgs/String URDF topic (transient local)"),
    ("image_transport", "", "raw | compressed"),
    ("model_path", "", "trained model (.safetensors); empty: the parameter file / packaged default"),
    ("robot", "", "robot definition (resource/robots/<name>.yaml or a path); empty: the parameter file"),
    ("mode", "", "articulated | rigid; empty: the parameter file"),
    ("urdf_file", "", "URDF file instead of the robot_description topic"),
    ("camera_frame", "", "frame of the published pose; empty: the image's frame_id"),
    ("ee_frame", "", "child frame of the published TF; empty: <end_effector>_estimated"),
    ("base_frame", "", "robot base frame; empty: the robot definition's base_link"),
    ("publish_camera_tf", "", "true: also broadcast base_frame -> <camera_frame>_estimated"),
    ("camera_extrinsic_from_tf", "", "true: seed camera-from-base with /tf_static base_frame -> camera_frame"),
    ("params_file", "", "parameter YAML; empty: <share>/pose_estimator/config/pose_estimator.yaml"),
    ("namespace", "", "namespace of the node"),
    ("node_name", "pose_estimator", "name of the node"),
    ("use_sim_time", "false", "use /clock (e.g. with `pose-estimator play --clock`)"),
    ("log_level", "info", "debug | info | warn | error"),
]

# Arguments that override a node parameter when non-empty: argument -> (parameter, type).
PARAMETER_ARGUMENTS = {
    "image_transport": ("image_transport", str),
    "model_path": ("model_path", str),
    "robot": ("estimator.robot", str),
    "mode": ("estimator.mode", str),
    "urdf_file": ("urdf_file", str),
    "camera_frame": ("camera_frame", str),
    "ee_frame": ("ee_frame", str),
    "base_frame": ("base_frame", str),
    "publish_camera_tf": ("publish_camera_tf", bool),
    "camera_extrinsic_from_tf": ("camera_extrinsic_from_tf", bool),
}


def _as_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got '{text}'")


def _node(context):
    value = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    params_file = value["params_file"] or os.path.join(get_package_share_directory("pose_estimator"), "config",
                                                       "pose_estimator.yaml")
    overrides = {"use_sim_time": _as_bool(value["use_sim_time"])}
    for arg, (param, kind) in PARAMETER_ARGUMENTS.items():
        if value[arg]:
            overrides[param] = _as_bool(value[arg]) if kind is bool else value[arg]
    image = value["image"]
    return [Node(
        package="pose_estimator",
        executable="pose_estimator_node",
        name=value["node_name"],
        namespace=value["namespace"],
        output="screen",
        emulate_tty=True,
        parameters=[params_file, overrides],
        remappings=[
            ("image", image),
            ("image/compressed", f"{image}/compressed"),
            ("camera_info", value["camera_info"]),
            ("joint_states", value["joint_states"]),
            ("robot_description", value["robot_description"]),
        ],
        arguments=["--ros-args", "--log-level", value["log_level"]],
    )]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc) for name, default, doc in ARGUMENTS]
        + [OpaqueFunction(function=_node)]
    )
