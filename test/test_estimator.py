"""Estimator and model files: the FIG. 3 call end to end, bad inputs, safe loading."""

import numpy as np
import pytest
import torch

from pose_estimator.config import EstimatorConfig
from pose_estimator.estimator import Estimator, kinematic_roi, refine_roi
from pose_estimator.geometry import CameraModel
from pose_estimator.model_io import ModelFormatError, load_model, save_model
from pose_estimator.network import HeatmapNet, HeatmapNetConfig


@pytest.fixture(scope="module")
def tiny_net(panda):
    torch.manual_seed(0)
    return HeatmapNet(HeatmapNetConfig(num_keypoints=panda.num_keypoints, input_size=(64, 64), base_width=4, depth=2))


@pytest.fixture
def camera():
    return CameraModel(np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]]), 640, 480)


def scene(panda, seed):
    """A random configuration (n,) and a camera 1.8 m away looking along the base's +x, T_camera_base."""
    q = panda.random_configuration(1, generator=torch.Generator().manual_seed(seed))[0].numpy()
    T_cb = np.eye(4)
    T_cb[:3, 3] = [0, 0.2, 1.8]
    T_cb[:3, :3] = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]])
    return q, T_cb


def true_keypoints(panda, camera, q, T_cb):
    """Where the keypoints of configuration q project, image px (K, 2)."""
    from pose_estimator.geometry import project

    P = panda.keypoints_3d(torch.as_tensor(q)[None])[0].numpy() @ T_cb[:3, :3].T + T_cb[:3, 3]
    return project(torch.as_tensor(camera.K)[None], torch.as_tensor(P)[None])[0].numpy()


def test_model_round_trip_and_bad_files(tmp_path, panda, tiny_net):
    p = save_model(tmp_path / "m.safetensors", tiny_net, robot="panda", keypoint_names=panda.keypoint_names)
    net, info = load_model(p)
    assert info["robot"] == "panda" and info["keypoint_names"] == panda.keypoint_names
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


def test_estimator_rejects_bad_input(panda, tiny_net, camera):
    est = Estimator(panda, tiny_net, EstimatorConfig())
    q = np.zeros(panda.n_joints)
    with pytest.raises(ValueError, match="non-empty"):
        est.estimate(np.zeros((0, 0, 3), np.uint8), camera, q)
    with pytest.raises(ValueError, match="camera info says"):
        est.estimate(np.zeros((100, 100, 3), np.uint8), camera, q)
    with pytest.raises(ValueError, match="NaN"):
        est.estimate(np.zeros((480, 640, 3), np.uint8), camera, np.full(panda.n_joints, np.nan))
    with pytest.raises(ValueError, match="expected"):
        est.estimate(np.zeros((480, 640, 3), np.uint8), camera, np.zeros(3))
    with pytest.raises(ValueError, match="keypoints"):
        Estimator(panda, HeatmapNet(HeatmapNetConfig(num_keypoints=3, input_size=(64, 64), base_width=4, depth=2)))


def test_untrained_network_gives_no_confident_pose(panda, tiny_net, camera):
    """Flat heat maps: the estimator must not publish a tight pose."""
    est = Estimator(panda, tiny_net, EstimatorConfig())
    q, T_cb = scene(panda, 1)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    e = est.estimate(img, camera, q, camera_from_base=T_cb)
    assert e.keypoints.shape == (panda.num_keypoints, 2)
    assert np.allclose(e.keypoint_covariance, np.swapaxes(e.keypoint_covariance, 1, 2))
    # With the extrinsic and the joint prior, an estimate from uninformative heat maps may converge, but
    # only onto the kinematic pose with the priors' uncertainty: never somewhere else with confidence.
    if e.converged:
        d = e.pose[:3, 3] - e.kinematic_pose[:3, 3]
        m2 = float(d @ np.linalg.solve(e.covariance[:3, :3], d))
        assert m2 < 11.34, (m2, e.message)  # chi-square 3 dof, 99 %
        assert np.sqrt(np.linalg.eigvalsh(e.covariance[:3, :3]).max()) > 0.003


def test_an_observation_solves_again_under_other_factors(panda, tiny_net, camera):
    """observe() + solve() is estimate(); the observation keeps the network's own covariance, so solving
    it under other calibration factors gives what estimate() gives under them (what calibrate relies on)."""
    q, T_cb = scene(panda, 2)
    img = np.random.default_rng(3).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    est = Estimator(panda, tiny_net, EstimatorConfig(track_camera=False))
    obs = est.observe(img, camera, q, camera_from_base=T_cb)
    assert obs.seed_source == "extrinsic" and obs.keypoints.shape == (panda.num_keypoints, 2)
    for variance, joint_prior in ((1.0, 1.0), (0.3, 0.5), (4.0, 1.4)):
        est.model_variance_scale, est.joint_prior_scale = variance, joint_prior
        a, b = est.estimate(img, camera, q, camera_from_base=T_cb), est.solve(obs)
        np.testing.assert_allclose(a.keypoint_covariance, obs.keypoint_covariance * variance)
        np.testing.assert_allclose(b.keypoint_covariance, a.keypoint_covariance)
        assert a.converged == b.converged and a.message == b.message
        np.testing.assert_allclose(b.pose, a.pose, equal_nan=True)
        np.testing.assert_allclose(b.covariance, a.covariance)
    # the factors matter to the solution, so the comparison above is not between equal things by default
    est.model_variance_scale, est.joint_prior_scale = 1.0, 1.0
    c1 = est.solve(obs).covariance
    est.joint_prior_scale = 0.25
    assert not np.allclose(est.solve(obs).covariance, c1)


def test_a_frame_observed_before_a_reset_does_not_set_the_tracking_again(panda, tiny_net, camera):
    """The node's pipeline solves frame N while the network sees N+1: when N+1 resets the tracking (a
    recording looped), N's solution must not bring the old camera pose back as the next frames' seed."""
    import dataclasses

    q, T_cb = scene(panda, 4)
    uv = true_keypoints(panda, camera, q, T_cb)
    img = np.zeros((480, 640, 3), np.uint8)
    est = Estimator(panda, tiny_net, EstimatorConfig())

    def observed():  # the network's keypoints replaced by the truth, so the solve converges
        o = est.observe(img, camera, q, camera_from_base=T_cb)
        n = panda.num_keypoints
        return dataclasses.replace(o, keypoints=uv, keypoint_covariance=np.tile(np.eye(2), (n, 1, 1)),
                                   confidence=np.ones(n))

    assert est.solve(observed()).converged
    assert est.observe(img, camera, q).seed_source == "tracked"
    est.reset()
    assert est.observe(img, camera, q).seed_source == ""
    early = observed()
    est.reset()
    assert est.solve(early).converged
    assert est.observe(img, camera, q).seed_source == ""  # not "tracked" from before the reset
    assert est.solve(observed()).converged  # a frame after the reset tracks again
    assert est.observe(img, camera, q).seed_source == "tracked"


def test_a_lost_frame_does_not_replace_the_tracked_seed(panda, tiny_net, camera):
    """A frame whose pose comes out with many times the uncertainty of the frame the tracked camera pose
    came from (a frame lost in the image) keeps that seed, instead of seeding the following frames from
    wherever it landed; a frame about as certain replaces it, and with nothing tracked any frame does."""
    import dataclasses

    q, T_cb = scene(panda, 5)
    uv = true_keypoints(panda, camera, q, T_cb)
    img = np.zeros((480, 640, 3), np.uint8)
    n = panda.num_keypoints
    est = Estimator(panda, tiny_net, EstimatorConfig(camera_prior_sigma_m=0.0, track_max_sigma_ratio=3.0))

    def solved(sigma_px, shift=0.0, seed_source="tracked"):
        o = est.observe(img, camera, q, camera_from_base=T_cb)
        # as if seeded by the tracking (no extrinsic), from T_cb
        o = dataclasses.replace(o, keypoints=uv + shift, keypoint_covariance=np.tile(np.eye(2) * sigma_px ** 2, (n, 1, 1)),
                                confidence=np.ones(n), seed_source=seed_source)
        e = est.solve(o)
        assert e.converged, e.message
        return float(np.sqrt(np.linalg.eigvalsh(e.covariance[:3, :3]).max()))

    sd = solved(1.0)
    assert est.observe(img, camera, q).seed_source == "tracked"
    seed = est._camera_from_base.copy()
    assert solved(300.0, shift=40.0) > 3 * sd  # the same keypoints, 40 px off, told 300 px
    np.testing.assert_allclose(est._camera_from_base, seed)
    assert solved(2.0, shift=2.0) <= 3 * sd  # about as certain: it replaces the seed
    assert not np.allclose(est._camera_from_base, seed)
    est.reset()  # nothing tracked: the best there is beats starting over from PnP
    solved(300.0, shift=40.0)
    lost = est._camera_from_base.copy()
    assert not np.allclose(lost, seed)
    est.config.track_max_sigma_ratio = 0.0  # off: every converged frame seeds the next
    solved(1.0)
    solved(300.0, shift=40.0)
    np.testing.assert_allclose(est._camera_from_base, lost, atol=1e-6)
    # a frame seeded by an extrinsic sets no reference: the first one without it does
    est.config.track_max_sigma_ratio = 3.0
    solved(1.0, seed_source="extrinsic")
    assert est._tracked_sigma is None
    solved(300.0, shift=40.0)
    np.testing.assert_allclose(est._camera_from_base, lost, atol=1e-6)


def test_frames_without_an_extrinsic_get_their_own_pose_covariance_factor(panda, tiny_net, camera):
    """calibrate fits one factor on the published covariance for frames seeded by an extrinsic and one for
    the others (PnP, tracking); the estimator applies each to its frames, and an older model file with
    only the first uses it for both."""
    import dataclasses

    q, T_cb = scene(panda, 6)
    cfg = EstimatorConfig(camera_prior_sigma_m=0.0, track_camera=False)  # no prior: the same solve either way
    img = np.zeros((480, 640, 3), np.uint8)
    est = Estimator(panda, tiny_net, cfg, model_info={"extra": {"pose_covariance_scale": 2.0,
                                                                "pose_covariance_scale_no_extrinsic": 5.0}})
    obs = est.observe(img, camera, q, camera_from_base=T_cb)
    a = est.solve(obs)
    b = est.solve(dataclasses.replace(obs, seed_source="tracked"))
    np.testing.assert_allclose(b.covariance, a.covariance * 2.5)
    old = Estimator(panda, tiny_net, cfg, model_info={"extra": {"pose_covariance_scale": 2.0}})
    assert old.pose_covariance_scale_no_extrinsic == 2.0


def test_prismatic_joints_have_a_prior_in_metres(panda, tiny_net, camera):
    """joint_sigma (rad) holds the revolute joints, joint_sigma_m (m) the prismatic ones (the Panda's fingers)."""
    import dataclasses

    q, T_cb = scene(panda, 7)
    uv = true_keypoints(panda, camera, q, T_cb)
    img = np.zeros((480, 640, 3), np.uint8)
    prismatic = ~panda.joint_is_revolute
    assert prismatic.sum() == 2  # the two finger joints
    sd = {}
    for sigma_m in (0.02, 1e-4):
        est = Estimator(panda, tiny_net, EstimatorConfig(joint_sigma_m=sigma_m, track_camera=False))
        np.testing.assert_allclose(est.joint_sigma(), np.where(prismatic, sigma_m, 0.02))
        o = est.observe(img, camera, q, camera_from_base=T_cb)
        o = dataclasses.replace(o, keypoints=uv + 3.0, keypoint_covariance=np.tile(np.eye(2) * 4.0, (len(uv), 1, 1)),
                                confidence=np.ones(len(uv)))
        e = est.solve(o)
        assert e.converged, e.message
        sd[sigma_m] = np.sqrt(np.diag(e.joint_covariance))
    assert (sd[1e-4][prismatic] <= 1e-4 * 1.001).all() and (sd[0.02][prismatic] > 1e-3).all()
    np.testing.assert_allclose(sd[1e-4][~prismatic], sd[0.02][~prismatic], rtol=0.2)


def test_a_model_trained_for_it_looks_again_at_the_end_effector(panda, tiny_net, camera):
    q, T_cb = scene(panda, 3)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    uv_true = true_keypoints(panda, camera, q, T_cb)
    rigid = panda.definition.rigid_indices()
    # a model without the refinement crop's margin in its file: one crop, as before
    plain = Estimator(panda, tiny_net, EstimatorConfig()).observe(image, camera, q, T_cb)
    assert plain.refine_roi is None and plain.refined is None
    est = Estimator(panda, tiny_net, EstimatorConfig(), model_info={"extra": {"refine_margin": 0.5}})
    obs = est.observe(image, camera, q, T_cb)
    roi2 = refine_roi(uv_true, rigid, 640, 480, 0.5, 1.0)
    assert np.allclose(obs.refine_roi, roi2)
    # closer than the whole-arm crop, around the hand's keypoints
    assert obs.refine_roi[2] - obs.refine_roi[0] < 0.7 * (obs.roi[2] - obs.roi[0])
    x0, y0, x1, y1 = obs.refine_roi
    assert ((uv_true[rigid] > [x0, y0]) & (uv_true[rigid] < [x1, y1])).all()
    # the keypoints in the second crop combine both looks by their covariances; the rest are the first crop's
    uv2, cov2, _, _ = est._detect_raw(image, roi2, uv_true)
    r = obs.refined
    assert r.shape == (panda.num_keypoints,) and r[rigid].any()
    for k in np.flatnonzero(r):
        i1, i2 = np.linalg.inv(plain.keypoint_covariance[k]), np.linalg.inv(cov2[k])
        c = np.linalg.inv(i1 + i2)
        assert np.allclose(obs.keypoint_covariance[k], c)
        assert np.allclose(obs.keypoints[k], c @ (i1 @ plain.keypoints[k] + i2 @ uv2[k]))
        # tighter than either look alone
        assert np.linalg.det(c) < min(np.linalg.det(plain.keypoint_covariance[k]), np.linalg.det(cov2[k]))
    assert np.allclose(obs.keypoints[~r], plain.keypoints[~r])
    assert not r[panda.keypoint_names.index("base")]  # far from the hand: never from the close crop
    assert "network_refine" in obs.timings_ms
    # the second crop ran beside the first, in the estimator's helper thread; one after the other is the same
    helpers = [t for t in est._helper._threads if t.name.startswith("pose_estimator_crop")]
    assert helpers and all(t.is_alive() for t in helpers)
    serial = Estimator(panda, tiny_net, EstimatorConfig(parallel_crops=False),
                       model_info={"extra": {"refine_margin": 0.5}}).observe(image, camera, q, T_cb)
    assert np.array_equal(serial.refined, obs.refined)
    assert np.allclose(serial.keypoints, obs.keypoints) and np.allclose(serial.keypoint_covariance,
                                                                        obs.keypoint_covariance)
    assert obs.timings_ms["observe"] > 0
    est.close()
    assert est._helper is None and not any(t.is_alive() for t in helpers)
    assert np.allclose(est.observe(image, camera, q, T_cb).keypoints, obs.keypoints)  # a helper again
    est.close()
    # the config can switch it off; without a camera seed there is nothing to look closer at
    off = Estimator(panda, tiny_net, EstimatorConfig(refine_end_effector=False),
                    model_info={"extra": {"refine_margin": 0.5}})
    assert off.observe(image, camera, q, T_cb).refine_roi is None
    assert est.observe(image, camera, q).refine_roi is None
    assert refine_roi(uv_true, [], 640, 480, 0.5, 1.0) is None
    assert est.solve(obs).refine_roi == obs.refine_roi  # the estimate names it (the debug image draws it)


def test_kinematic_roi():
    uv = np.array([[100.0, 100], [200, 150], [np.nan, np.nan]])
    x0, y0, x1, y1 = kinematic_roi(uv, 640, 480, margin=0.25, aspect=1.0)
    assert x0 < 100 and x1 > 200 and y0 < 100 and y1 > 150
    assert np.isclose(x1 - x0, y1 - y0)
    assert kinematic_roi(np.full((3, 2), np.nan), 640, 480, 0.25, 1.0) is None
    assert kinematic_roi(np.array([[-900.0, -900], [-800, -850]]), 640, 480, 0.25, 1.0) is None


def test_estimator_runs_the_network_with_batch_norm_folded(panda):
    torch.manual_seed(0)
    net = HeatmapNet(HeatmapNetConfig(input_size=(64, 64), base_width=8, depth=2, num_keypoints=panda.num_keypoints))
    for m in net.modules():  # statistics and affine terms far from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.2, 3.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    est = Estimator(panda, net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in est.net.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(est.net(x), net(x), rtol=1e-4, atol=1e-4)
    # the caller's network is not touched: it can still be trained and saved as it was
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_on_a_cpu_the_network_runs_channels_last_with_the_same_keypoints(panda, tiny_net):
    est = Estimator(panda, tiny_net, EstimatorConfig())
    conv = next(m for m in est.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(tiny_net.parameters()).is_contiguous()  # the caller's network is left as it was
    image = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    uv, cov, conf, _ = est.detect(image, (100.0, 50.0, 500.0, 450.0))
    # the same folded network in the default layout gives the same keypoints
    est.net, est.memory_format = tiny_net.fused().eval(), torch.contiguous_format
    uv0, cov0, conf0, _ = est.detect(image, (100.0, 50.0, 500.0, 450.0))
    np.testing.assert_allclose(uv, uv0, atol=1e-3)
    np.testing.assert_allclose(cov, cov0, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(conf, conf0, atol=1e-5)
