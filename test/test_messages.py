"""The package's generated ROS messages: import, serialization, DDS pub/sub.

Needs rclpy and the colcon-built messages (`make setup`, then `source
activate.sh`). Skipped only where rclpy is not importable at all (the
ROS-free pip install of the library).
"""

import os
import subprocess
import sys
import time

import pytest

rclpy = pytest.importorskip(
    "rclpy", reason="rclpy not importable: ROS-free install, message tests skipped"
)

from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402

pytestmark = pytest.mark.ros

DEADLINE_S = 10.0


def _keypoint_array(n=3):
    from pose_estimator.msg import Keypoint, KeypointArray

    msg = KeypointArray()
    msg.header.stamp.sec = 1_700_000_000
    msg.header.stamp.nanosec = 123_456_789
    msg.header.frame_id = "camera_color_optical_frame"
    for i in range(n):
        kp = Keypoint()
        kp.name = f"panda_link{i}"
        kp.x = 100.25 + 10.0 * i
        kp.y = -3.5 + 7.0 * i  # may lie outside the image
        kp.covariance = [4.0 + i, 0.5, 0.5, 9.0 + i]
        kp.confidence = 0.9 - 0.1 * i
        kp.visible = i != 1
        msg.keypoints.append(kp)
    return msg


def _assert_same(a, b):
    assert b.header.stamp.sec == a.header.stamp.sec
    assert b.header.stamp.nanosec == a.header.stamp.nanosec
    assert b.header.frame_id == a.header.frame_id
    assert len(b.keypoints) == len(a.keypoints)
    for ka, kb in zip(a.keypoints, b.keypoints):
        assert kb.name == ka.name
        assert kb.x == ka.x and kb.y == ka.y
        assert list(kb.covariance) == list(ka.covariance)
        assert kb.confidence == ka.confidence
        assert kb.visible == ka.visible
    assert b == a


def test_generated_messages_import():
    import pose_estimator
    import pose_estimator.msg as m

    for name in ("Keypoint", "KeypointArray", "EstimateStatus"):
        assert hasattr(m, name), name
    fields = m.Keypoint.get_fields_and_field_types()
    assert fields == {
        "name": "string",
        "x": "double",
        "y": "double",
        "covariance": "double[4]",
        "confidence": "double",
        "visible": "boolean",
    }
    assert m.KeypointArray.get_fields_and_field_types() == {
        "header": "std_msgs/Header",
        "keypoints": "sequence<pose_estimator/Keypoint>",
    }
    status = m.EstimateStatus(converged=True, residual=1.5, iterations=7, inliers=5,
                              keypoints=6, mode="rigid", message="")
    assert status.converged and status.mode == "rigid"
    # The generated msg package is merged into the source package (extend_path).
    assert os.path.dirname(m.__file__).rstrip(os.sep).endswith(os.path.join("pose_estimator", "msg"))
    assert os.path.dirname(os.path.dirname(m.__file__)) in [os.path.abspath(p) for p in pose_estimator.__path__]


def test_source_checkout_shadows_install():
    """From an activated shell, pose_estimator.* is the repo's source, msg from install/."""
    root = os.environ.get("POSE_ESTIMATOR_ROOT")
    if not root:
        pytest.skip("not run from activate.sh (POSE_ESTIMATOR_ROOT unset)")
    code = (
        "import pose_estimator, pose_estimator.msg as m; "
        "print(pose_estimator.__file__); print(m.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    pkg_file, msg_file = out[-2], out[-1]
    assert pkg_file == os.path.join(root, "pose_estimator", "__init__.py")
    assert msg_file.startswith(os.path.join(root, "install") + os.sep)


def test_keypoint_array_serialization_round_trip():
    from pose_estimator.msg import KeypointArray

    msg = _keypoint_array(3)
    data = serialize_message(msg)
    assert isinstance(data, bytes) and len(data) > 0
    back = deserialize_message(data, KeypointArray)
    _assert_same(msg, back)


def test_tf_message_constructs():
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage

    t = TransformStamped()
    t.header.frame_id = "panda_link0"
    t.child_frame_id = "panda_hand"
    t.transform.translation.x = 0.3
    t.transform.rotation.w = 1.0
    tf = TFMessage(transforms=[t])
    back = deserialize_message(serialize_message(tf), TFMessage)
    assert back.transforms[0].child_frame_id == "panda_hand"
    assert back.transforms[0].transform.translation.x == 0.3


@pytest.mark.timeout(60)
def test_keypoint_array_pub_sub_over_dds():
    """Two nodes in one process exchange a KeypointArray over DDS on loopback."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from pose_estimator.msg import KeypointArray

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")
    domain_id = int(os.environ.get("ROS_DOMAIN_ID", str(50 + os.getpid() % 50)))

    context = rclpy.context.Context()
    rclpy.init(context=context, domain_id=domain_id)
    executor = SingleThreadedExecutor(context=context)
    nodes = []
    try:
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        topic = f"/pose_estimator_test/keypoints_{os.getpid()}"
        talker = rclpy.create_node("test_keypoints_talker", context=context)
        listener = rclpy.create_node("test_keypoints_listener", context=context)
        nodes += [talker, listener]
        received = []
        listener.create_subscription(KeypointArray, topic, received.append, qos)
        pub = talker.create_publisher(KeypointArray, topic, qos)
        executor.add_node(talker)
        executor.add_node(listener)

        sent = _keypoint_array(3)
        deadline = time.monotonic() + DEADLINE_S
        # Wait until discovery has matched the endpoints.
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        assert pub.get_subscription_count() > 0, "publisher and subscription never matched"
        # Publish (again every 0.5 s, in case the reader side matched later) until received.
        next_pub = 0.0
        while not received and time.monotonic() < deadline:
            if time.monotonic() >= next_pub:
                pub.publish(sent)
                next_pub = time.monotonic() + 0.5
            executor.spin_once(timeout_sec=0.05)
        assert received, f"no KeypointArray received within {DEADLINE_S} s"
        _assert_same(sent, received[0])
    finally:
        executor.shutdown()
        for node in nodes:
            node.destroy_node()
        rclpy.shutdown(context=context)
