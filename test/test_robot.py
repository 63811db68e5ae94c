"""RobotModel: a robot is a URDF plus a keypoint YAML; kinematics and Jacobians are right."""

import math
from pathlib import Path

import pytest
import torch

from pose_estimator.robot import RobotDefinition, RobotModel

D = torch.float64


def test_panda_definition_loads_from_the_resource_folder(panda):
    assert panda.definition.end_effector == "panda_hand"
    assert panda.num_keypoints == len(panda.keypoint_names) >= 10
    assert panda.n_joints == 9  # 7 arm joints + 2 finger joints
    assert len(panda.definition.rigid_indices()) >= 4


def test_point_jacobian_matches_finite_differences(panda):
    q = panda.random_configuration(4, generator=torch.Generator().manual_seed(0))
    _, J = panda.keypoints_and_jacobian(q)
    eps = 1e-6
    cols = []
    for j in range(panda.n_joints):
        e = torch.zeros(panda.n_joints, dtype=D)
        e[j] = eps
        cols.append((panda.keypoints_3d(q + e) - panda.keypoints_3d(q - e)) / (2 * eps))
    Jn = torch.stack(cols, -1)
    assert float((J - Jn).abs().max()) < 1e-8


def test_ee_jacobian_linear_part_matches_finite_differences(panda):
    q = panda.random_configuration(2, generator=torch.Generator().manual_seed(1))
    T, J = panda.ee_jacobian(q)
    eps = 1e-6
    for j in range(panda.n_joints):
        e = torch.zeros(panda.n_joints, dtype=D)
        e[j] = eps
        dp = (panda.ee_pose(q + e)[:, :3, 3] - panda.ee_pose(q - e)[:, :3, 3]) / (2 * eps)
        assert float((dp - J[:, :3, j]).abs().max()) < 1e-8
        dR = (panda.ee_pose(q + e)[:, :3, :3] - panda.ee_pose(q - e)[:, :3, :3]) / (2 * eps)
        W = dR @ T[:, :3, :3].transpose(-1, -2)  # skew(omega)
        omega = torch.stack([W[:, 2, 1], W[:, 0, 2], W[:, 1, 0]], -1)
        assert float((omega - J[:, 3:, j]).abs().max()) < 1e-7


def test_keypoints_in_ee_frame_do_not_depend_on_arm_joints(panda):
    g = torch.Generator().manual_seed(2)
    q = panda.random_configuration(3, generator=g)
    q[:, 7:] = 0.02  # same gripper opening
    idx = panda.definition.rigid_indices()
    p = panda.keypoints_in_ee(q, idx)
    assert float((p - p[:1]).abs().max()) < 1e-12


def test_a_new_arm_is_a_urdf_and_a_yaml(tmp_path):
    y = tmp_path / "iiwa.yaml"
    y.write_text(
        "name: iiwa\n"
        "urdf: pybullet_data://kuka_iiwa/model.urdf\n"
        "base_link: lbr_iiwa_link_0\n"
        "end_effector: lbr_iiwa_link_7\n"
        "keypoints:\n"
        "  - {name: base, link: lbr_iiwa_link_0, offset: [0, 0, 0.1]}\n"
        "  - {name: elbow, link: lbr_iiwa_link_4, offset: [0, 0, 0]}\n"
        "  - {name: wrist, link: lbr_iiwa_link_6, offset: [0, 0, 0]}\n"
        "  - {name: flange, link: lbr_iiwa_link_7, offset: [0, 0, 0.05]}\n"
        "  - {name: marker, link: world, offset: [0.5, 0.0, 0.0]}\n"
        "rigid_keypoints: [flange]\n"
    )
    m = RobotModel.from_yaml(y)
    assert m.n_joints == 7
    q = torch.zeros(1, 7, dtype=D)
    p = m.keypoints_3d(q)
    assert p.shape == (1, 5, 3)
    # At zero the iiwa stands straight up: the flange is ~1.3 m above the base.
    assert 1.1 < float(p[0, 3, 2]) < 1.4
    # A point fixed in the world does not move with the joints and has no Jacobian.
    q2 = torch.full((1, 7), 0.3, dtype=D)
    p2, J2 = m.keypoints_and_jacobian(q2)
    assert torch.allclose(p2[0, 4], torch.tensor([0.5, 0.0, 0.0], dtype=D))
    assert float(J2[0, 4].abs().max()) == 0.0


def test_robot_description_string_overrides_the_urdf_file(panda):
    xml = panda.urdf_xml
    m = RobotModel.from_yaml("panda", robot_description=xml)
    q = panda.random_configuration(1, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(m.keypoints_3d(q), panda.keypoints_3d(q))


@pytest.mark.parametrize("text,msg", [
    ("name: x\nurdf: a.urdf\nbase_link: a\nend_effector: b\n", "missing required field 'keypoints'"),
    ("name: x\nurdf: a.urdf\nbase_link: a\nend_effector: b\nkeypoints: []\n", "no keypoints"),
    ("name: x\nurdf: a.urdf\nbase_link: a\nend_effector: b\nkeypoints:\n  - {name: p, link: a}\n"
     "  - {name: p, link: a}\n", "duplicate keypoint"),
    ("name: x\nurdf: a.urdf\nbase_link: a\nend_effector: b\nkeypoints:\n  - {name: p, link: a, offset: [1, 2]}\n",
     "3 finite numbers"),
    ("name: x\nurdf: a.urdf\nbase_link: a\nend_effector: b\nkeypoints:\n  - {name: p, link: a}\n"
     "rigid_keypoints: [q]\n", "not among keypoints"),
    ("format_version: 99\nname: x\n", "format_version 99"),
    ("[not, a, mapping]\n", "mapping"),
])
def test_malformed_keypoint_yaml_gives_a_clear_error(tmp_path, text, msg):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ValueError, match=msg):
        RobotDefinition.from_yaml(y)


def test_keypoint_on_a_link_missing_from_the_urdf_is_rejected(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("name: x\nurdf: pybullet_data://franka_panda/panda.urdf\nbase_link: panda_link0\n"
                 "end_effector: panda_hand\nkeypoints:\n  - {name: p, link: no_such_link}\n")
    with pytest.raises(ValueError, match="no_such_link"):
        RobotModel.from_yaml(y)


def test_joint_vector_orders_names_and_rejects_strangers(panda):
    names = list(reversed(panda.joint_names))
    pos = [float(i) for i in range(len(names))]
    q = panda.joint_vector(names, pos)
    assert float(q[panda.joint_names.index(names[0])]) == 0.0
    with pytest.raises(ValueError, match="not in the URDF"):
        panda.joint_vector(["a", "b"], [0.0, 1.0])
    with pytest.raises(ValueError, match="missing"):
        panda.joint_vector(panda.joint_names[:3], [0.0] * 3)
    q = panda.joint_vector(panda.joint_names[:7], [0.1] * 7, default=torch.zeros(panda.n_joints, dtype=D))
    assert math.isclose(float(q[0]), 0.1)


def test_missing_robot_definition_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="robot definition not found"):
        RobotDefinition.from_yaml("no_such_robot")


def test_pybullet_data_urdf_may_come_from_a_copy(panda, tmp_path, monkeypatch):
    """A training machine without pybullet names a copy of the URDF's folder (scripts/train_on_gpu.sh)."""
    import pybullet_data

    src = Path(pybullet_data.getDataPath()) / "franka_panda" / "panda.urdf"
    (tmp_path / "franka_panda").mkdir()
    (tmp_path / "franka_panda" / "panda.urdf").write_text(src.read_text())
    monkeypatch.setenv("POSE_ESTIMATOR_PYBULLET_DATA", str(tmp_path))
    copy = RobotModel.from_yaml("panda")
    q = torch.full((1, panda.n_joints), 0.3, dtype=torch.float64)
    assert torch.allclose(copy.ee_pose(q), panda.ee_pose(q))
    monkeypatch.setenv("POSE_ESTIMATOR_PYBULLET_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises((FileNotFoundError, ValueError), match="elsewhere"):
        RobotModel.from_yaml("panda")
