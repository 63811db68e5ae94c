"""Launch test: pose_estimator.launch.py with a recording played into it (launch_testing).

Runs wherever ``launch_testing`` (and ``launch_ros``, ``launch_testing_ros``)
are installed, e.g. a ROS 2 Humble/Jazzy/Kilted install after ``colcon
build``; ``pytest`` collects it through launch_testing's plugin. Elsewhere
(the PyPI wheels have no launch packages) it is skipped with the reason.
"""

from __future__ import annotations

import os
import sys
import tempfile
import unittest
from pathlib import Path

import pytest

launch_testing = pytest.importorskip(
    "launch_testing", reason="launch_testing is not installed (it is not on PyPI; a full ROS 2 install has it)")
pytest.importorskip("launch_ros", reason="launch_ros is not installed")
pytest.importorskip("launch_testing_ros", reason="launch_testing_ros is not installed")

import launch  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
from launch.actions import ExecuteProcess, IncludeLaunchDescription  # noqa: E402
from launch.launch_description_sources import PythonLaunchDescriptionSource  # noqa: E402
from launch_testing_ros import WaitForTopics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / f"pose_estimator_launch_test_{os.getuid()}"
_LAUNCHED = []  # set when launch_testing has called generate_test_description in this process


def _require_launch(case: unittest.TestCase) -> None:
    if not _LAUNCHED:
        case.skipTest("collected as a plain pytest module: launch_testing's pytest plugin is not active "
                      "(run `launch_test test/test_launch.py`, or pytest where launch_testing is installed)")


@pytest.mark.launch_test
def generate_test_description():
    _LAUNCHED.append(True)
    from pose_estimator.ros.testing import make_model, make_recording

    recording = make_recording(CACHE / "recordings", frames=20, width=320, height=256)
    model = make_model(CACHE / "models" / "untrained.safetensors")
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(str(ROOT / "launch" / "pose_estimator.launch.py")),
        launch_arguments={"model_path": str(model), "camera_extrinsic_from_tf": "true",
                          "publish_camera_tf": "true"}.items())
    player = ExecuteProcess(
        cmd=[sys.executable, "-m", "pose_estimator.ros.player", str(recording), "--loop", "--quiet",
             "--wait-for", "/camera/image_raw", "/joint_states", "--wait-timeout", "60"],
        name="player", output="screen")
    return launch.LaunchDescription([node, player, launch_testing.actions.ReadyToTest()]), {"player": player}


class TestNodeOutputs(unittest.TestCase):

    def setUp(self):
        _require_launch(self)

    def test_outputs_arrive(self):
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from tf2_msgs.msg import TFMessage

        from pose_estimator.msg import EstimateStatus, KeypointArray

        topics = [("/pose_estimator/keypoints", KeypointArray), ("/pose_estimator/status", EstimateStatus),
                  ("/diagnostics", DiagnosticArray), ("/pose_estimator/pose", PoseWithCovarianceStamped),
                  ("/tf", TFMessage)]
        wait = WaitForTopics(topics, timeout=90.0)
        try:
            assert wait.wait(), f"no messages on {wait.topics_not_received()}"
            kps = wait.received_messages("/pose_estimator/keypoints")
            assert len(kps[0].keypoints) == 14 and kps[0].header.frame_id == "camera_optical_frame"
            import numpy as np

            for pose in wait.received_messages("/pose_estimator/pose"):
                C = np.array(pose.pose.covariance).reshape(6, 6)
                assert np.allclose(C, C.T) and np.linalg.eigvalsh(C).min() > 0
            children = {t.child_frame_id for m in wait.received_messages("/tf") for t in m.transforms}
            assert "panda_hand_estimated" in children, children
            names = {s.name for m in wait.received_messages("/diagnostics") for s in m.status}
            assert any(n.startswith("pose_estimator") for n in names), names
        finally:
            wait.shutdown()


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def setUp(self):
        _require_launch(self)

    def test_exit_codes(self, proc_info):
        # 0 for the node and the player; -2 (SIGINT) where a process was interrupted before it returned.
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2])
