"""Estimator and model files: the FIG. 3 call end to end, bad inputs, safe loading."""

import numpy as np
import pytest
import torch

from pose_estimator.config import EstimatorConfig
from pose_estimator.estimator import Estimator, kinematic_roi
from pose_estimator.geometry import CameraModel
from pose_estimator.model_io import ModelFormatError, load_model, save_model
from pose_estimator.network import HeatmapNet, HeatmapNetConfig
from pose_estimator.robot import RobotModel


@pytest.fixture(scope="module")
def robot():
    return RobotModel.from_yaml("panda")


@pytest.fixture(scope="module")
def tiny_net(robot):
    torch.manual_seed(0)
    return HeatmapNet(HeatmapNetConfig(num_keypoints=robot.num_keypoints, input_size=(64, 64), base_width=4, depth=2))


@pytest.fixture
def camera():
    return CameraModel(np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]), 640, 480)


def test_model_round_trip_and_bad_files(tmp_path, robot, tiny_net):
    p = save_model(tmp_path / "m.safetensors", tiny_net, robot="panda", keypoint_names=robot.keypoint_names)
    net, info = load_model(p)
    assert info["robot"] == "panda" and info["keypoint_names"] == robot.keypoint_names
    for k, v in tiny_net.state_dict().items():
        assert torch.equal(v, net.state_dict()[k])
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(p.read_bytes()[:200])
    with pytest.raises(ModelFormatError):
        load_model(tmp_path / "trunc.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ModelFormatError):
        load_model(tmp_path / "text.safetensors")
    # a pickle is never executed: it is simply not a model
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.pt")
    with pytest.raises(ModelFormatError):
        load_model(tmp_path / "pickle.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ModelFormatError, match="not a pose_estimator model"):
        load_model(tmp_path / "other.safetensors")


def test_estimator_rejects_bad_input(robot, tiny_net, camera):
    est = Estimator(robot, tiny_net, EstimatorConfig())
    q = np.zeros(robot.n_joints)
    with pytest.raises(ValueError, match="non-empty"):
        est.estimate(np.zeros((0, 0, 3), np.uint8), camera, q)
    with pytest.raises(ValueError, match="camera info says"):
        est.estimate(np.zeros((100, 100, 3), np.uint8), camera, q)
    with pytest.raises(ValueError, match="NaN"):
        est.estimate(np.zeros((480, 640, 3), np.uint8), camera, np.full(robot.n_joints, np.nan))
    with pytest.raises(ValueError, match="expected"):
        est.estimate(np.zeros((480, 640, 3), np.uint8), camera, np.zeros(3))
    with pytest.raises(ValueError, match="keypoints"):
        Estimator(robot, HeatmapNet(HeatmapNetConfig(num_keypoints=3, input_size=(64, 64), base_width=4, depth=2)))


def test_untrained_network_gives_no_confident_pose(robot, tiny_net, camera):
    """Flat heat maps: the estimator must not publish a tight pose."""
    est = Estimator(robot, tiny_net, EstimatorConfig())
    q = robot.random_configuration(1, generator=torch.Generator().manual_seed(1))[0].numpy()
    T_cb = np.eye(4)
    T_cb[:3, 3] = [0, 0.2, 1.8]
    T_cb[:3, :3] = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]])  # camera looking along base +x
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    e = est.estimate(img, camera, q, camera_from_base=T_cb)
    assert e.keypoints.shape == (robot.num_keypoints, 2)
    assert np.allclose(e.keypoint_covariance, np.swapaxes(e.keypoint_covariance, 1, 2))
    # With the extrinsic and the joint prior, an estimate from uninformative heat maps may converge, but
    # only onto the kinematic pose with the priors' uncertainty: never somewhere else with confidence.
    if e.converged:
        d = e.pose[:3, 3] - e.kinematic_pose[:3, 3]
        m2 = float(d @ np.linalg.solve(e.covariance[:3, :3], d))
        assert m2 < 11.34, (m2, e.message)  # chi-square 3 dof, 99 %
        assert np.sqrt(np.linalg.eigvalsh(e.covariance[:3, :3]).max()) > 0.003


def test_kinematic_roi():
    uv = np.array([[100.0, 100], [200, 150], [np.nan, np.nan]])
    x0, y0, x1, y1 = kinematic_roi(uv, 640, 480, margin=0.25, aspect=1.0)
    assert x0 < 100 and x1 > 200 and y0 < 100 and y1 > 150
    assert np.isclose(x1 - x0, y1 - y0)
    assert kinematic_roi(np.full((3, 2), np.nan), 640, 480, 0.25, 1.0) is None
    assert kinematic_roi(np.array([[-900.0, -900], [-800, -850]]), 640, 480, 0.25, 1.0) is None


def test_keypoint_patch_rois():
    from pose_estimator.estimator import keypoint_patch_rois

    uv = np.array([[100.0, 100], [300, 200], [np.nan, np.nan], [-500, 100], [630, 470]])
    rois, side = keypoint_patch_rois(uv, 640, 480, fraction=0.25)
    assert side == pytest.approx(0.25 * 1130)  # the arm's extent includes points outside the image
    ok = np.isfinite(rois).all(1)
    assert ok.tolist() == [True, True, False, False, True]
    assert np.allclose((rois[ok, :2] + rois[ok, 2:]) / 2, uv[ok])
    assert np.allclose(rois[ok, 2] - rois[ok, 0], side)
    assert not np.isfinite(keypoint_patch_rois(np.full((3, 2), np.nan), 640, 480, 0.25)[0]).any()
    assert keypoint_patch_rois(np.array([[10.0, 10.0]]), 640, 480, 0.25)[1] == 16.0  # a floor on the side


class DotFinder(HeatmapNet):
    """A stand-in network that answers, in every channel, 'the brightest spot': it lets the patch
    geometry (regions, affines, channel selection) be checked exactly against painted dots."""

    def forward(self, x):
        lum = x.mean(1, keepdim=True)
        lum = torch.nn.functional.avg_pool2d(lum, self.config.stride)
        return (lum * 4.0).expand(-1, self.config.num_keypoints, -1, -1)


def test_patch_model_finds_each_keypoint_in_its_own_patch(tmp_path, robot, tiny_net, camera):
    import cv2

    torch.manual_seed(0)
    net = DotFinder(HeatmapNetConfig(num_keypoints=robot.num_keypoints, input_size=(32, 32), base_width=4, depth=2))
    p = save_model(tmp_path / "patch.safetensors", net, robot="panda", keypoint_names=robot.keypoint_names,
                   extra={"roi": "keypoints", "patch_fraction": 0.12}, coarse=tiny_net,
                   coarse_extra={"keypoint_variance_scale": 2.0})
    _, info = load_model(p)
    assert info["coarse"] is not None and info["coarse_extra"]["keypoint_variance_scale"] == 2.0
    for k, v in tiny_net.state_dict().items():
        assert torch.equal(v, info["coarse"].state_dict()[k])
    est = Estimator(robot, net, EstimatorConfig(), model_info=info)
    assert est.roi_mode == "keypoints" and est.patch_fraction == 0.12
    # Kinematic projections spread over the image; the true keypoints a few px away from them.
    rng = np.random.default_rng(0)
    # (far enough apart that no patch holds another keypoint's dot: the stand-in cannot tell dots apart)
    uv_kin = np.column_stack([np.linspace(60, 580, robot.num_keypoints),
                              np.where(np.arange(robot.num_keypoints) % 2, 100.0, 380.0)])
    uv_kin[3] = np.nan  # behind the camera
    uv_kin[5] = (-200.0, 240.0)  # its patch lies outside the image
    truth = uv_kin + rng.uniform(-5, 5, uv_kin.shape)
    img = np.zeros((480, 640, 3), np.uint8)
    for u, v in truth[np.isfinite(truth).all(1)]:
        cv2.circle(img, (int(u * 16), int(v * 16)), 8 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    uv, cov, conf, arm, ms = est.detect_patches(img, uv_kin)
    found = np.isfinite(uv).all(1)
    assert found.tolist() == [k not in (3, 5) for k in range(robot.num_keypoints)]
    assert np.abs(uv[found] - truth[found]).max() < 1.0, np.abs(uv[found] - truth[found]).max()
    assert (conf[~found] == 0).all() and arm is not None and "network" in ms
    # Without a camera seed the coarse (whole-arm) network runs; without one either, a clear failure.
    q = np.zeros(robot.n_joints)
    e = est.estimate(img, camera, q)
    assert e.roi is not None and e.keypoints.shape == (robot.num_keypoints, 2)
    bare = Estimator(robot, net, EstimatorConfig(), model_info={"extra": info["extra"]})
    e = bare.estimate(img, camera, q)
    assert not e.converged and "camera seed" in e.message
