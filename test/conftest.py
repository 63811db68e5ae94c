"""Test-wide settings: ROS 2 environment defaults and markers.

Every test process gets loopback-only DDS discovery and its own ROS domain, so
parallel runs (and other ROS users on the machine) do not see each other.
Values already in the environment (e.g. from activate.sh) are kept, except that
ROS_DOMAIN_ID is per process unless POSE_ESTIMATOR_TEST_DOMAIN_ID is set.
"""

import os

import pytest

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ["ROS_DOMAIN_ID"] = os.environ.get(
    "POSE_ESTIMATOR_TEST_DOMAIN_ID", str(50 + os.getpid() % 50)
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "ros: needs rclpy and the built ROS messages")


@pytest.fixture(scope="module")
def panda():
    """The Panda robot model (URDF + keypoint YAML), loaded once per test module."""
    from pose_estimator.robot import RobotModel

    return RobotModel.from_yaml("panda")
