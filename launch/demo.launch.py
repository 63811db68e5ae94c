"""The demo: play a recording of the simulated Panda into the node, and show it in rviz.

    pose-estimator generate --sequences 1 --frames-per-sequence 300 --bag --out data/demo
    ros2 launch pose_estimator demo.launch.py bag:=data/demo/seq_00000 loop:=true

Starts the recording player (``python -m pose_estimator.ros.player``, the
``ros2 bag play`` stand-in, publishing /clock), the node (through
``pose_estimator.launch.py``, with the recording's topic names and sim time),
``robot_state_publisher`` for the arm's own TF (when installed), and rviz2
with ``config/pose_estimator.rviz`` (when installed and ``rviz:=true``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, IncludeLaunchDescription, LogInfo, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

ARGUMENTS = [
    ("bag", "", "recording to play: a rosbag2 folder or a generated sequence folder (with bag/)"),
    ("rate", "1.0", "playback speed factor"),
    ("loop", "true", "start the recording over when it ends"),
    ("model_path", "", "trained model (.safetensors); empty: the packaged default"),
    ("rviz", "true", "start rviz2 (when installed)"),
    ("camera_extrinsic_from_tf", "false", "seed camera-from-base with the recording's /tf_static"),
]


def _installed(package: str) -> bool:
    try:
        get_package_share_directory(package)
        return True
    except (PackageNotFoundError, LookupError, ValueError):
        return False


def _actions(context):
    value = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    if not value["bag"]:
        raise RuntimeError("demo.launch.py needs bag:=PATH (make one with `pose-estimator generate --sequences 1 "
                           "--bag --out data/demo`, then bag:=data/demo/seq_00000)")
    share = get_package_share_directory("pose_estimator")
    play = [sys.executable, "-m", "pose_estimator.ros.player", value["bag"], "--rate", value["rate"], "--clock",
            "--wait-for", "/camera/image_raw", "--wait-timeout", "30"]
    if value["loop"].lower() in ("true", "1", "yes"):
        play.append("--loop")
    actions = [
        ExecuteProcess(cmd=play, name="player", output="screen"),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "pose_estimator.launch.py")),
            launch_arguments={
                "image": "/camera/image_raw", "camera_info": "/camera/camera_info", "joint_states": "/joint_states",
                "robot_description": "/robot_description", "model_path": value["model_path"],
                "use_sim_time": "true", "publish_camera_tf": "true",
                "camera_extrinsic_from_tf": value["camera_extrinsic_from_tf"],
            }.items()),
    ]
    if _installed("robot_state_publisher"):
        from pose_estimator.robot import RobotDefinition

        urdf = Path(RobotDefinition.from_yaml("panda").urdf_path()).read_text()
        actions.append(Node(package="robot_state_publisher", executable="robot_state_publisher",
                            parameters=[{"robot_description": urdf, "use_sim_time": True}], output="log",
                            remappings=[("robot_description", "/robot_description_rsp")]))
    if value["rviz"].lower() in ("true", "1", "yes"):
        if _installed("rviz2"):
            actions.append(Node(package="rviz2", executable="rviz2", output="log",
                                arguments=["-d", os.path.join(share, "config", "pose_estimator.rviz")],
                                parameters=[{"use_sim_time": True}]))
        else:
            actions.append(LogInfo(msg="rviz2 is not installed: running without it"))
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=doc) for name, default, doc in ARGUMENTS]
        + [OpaqueFunction(function=_actions)]
    )
